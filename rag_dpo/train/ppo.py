"""Multi-turn PPO (and a critic-free GRPO variant) for search agents, with retrieval inside the rollout.

TRL 1.16 has no PPOTrainer (and its old one was single-turn), so this is a compact one on torch + accelerate:

    rollout (RolloutEngine: generate a step, retrieve, append <information>, repeat)
    -> tokens via protocol.tokenize_path (policy_mask: 1 on the policy's own tokens, 0 on prompt and retrieved text)
    -> rewards on tokens:  outcome  = final-answer F1/EM on the last policy token;
                           process  = each step's annotator value on that step's last token, plus the outcome
    -> PPO: per-token KL penalty to the reference in the reward, GAE over the policy tokens only, clipped policy
       loss and clipped value loss (value head on the policy's last hidden state, detached: the value loss trains
       the head only, and the policy's and the head's gradients are clipped each to its own norm);
       GRPO: no critic; rewards normalised within each question's group of samples over every position a reward
       is placed on (each step's end in process mode, so a step worth 0 gets a negative advantage when its
       siblings score higher), advantage = normalised reward-to-go, KL (k3 estimator) in the loss.

Credit assignment: gamma = lambda = 1 by default (Search-R1's setting). With lambda = 0.95 per token and a value
head that starts at 0, the outcome reward reached a first search step ~60 policy tokens before the answer at
0.95^60 ~ 5 % of its size, so "outcome vs process" compared mostly how far lambda lets the signal travel; with
lambda = 1 the advantage of every token is its return-to-go minus its value, whatever the chain length.
Divergence guard: a non-finite loss, gradient norm or KL stops the run (`TrainingDiverged`, one line naming the
round) before anything of that round is saved, so the last checkpoint on disk is the last good round.

Retrieved tokens are environment transitions, not actions: GAE runs over the compressed sequence of policy tokens
(the value after a retrieved block bootstraps the step before it), and every loss is a masked mean with the policy
mask, so retrieved tokens get zero gradient. The reference is the starting policy: with a fresh LoRA adapter the
adapter is disabled; when continuing an adapter (e.g. the warm start) a frozen copy "ref" is kept (as TRL's
DPOTrainer does). Rewards are placed on the same step spans the rollout engine recorded.

Under a multi-process launch (`torchrun`, `accelerate launch`; rag_dpo.distributed) accelerate wraps the policy in
DDP, and a round is split so that it computes what one process would: each rank rolls out its share of the round's
questions (`questions[rank::world]`, every sample of a question on the same rank), the chains are gathered on every
rank in the one-process order; the no-grad passes (old, reference log-probs, values) are dealt round the ranks by
minibatch and summed back (`all_reduce_sum`), so advantages are computed on the whole round identically everywhere;
each optimiser minibatch is split between the ranks and each rank's masked mean is rescaled to its share of the
minibatch's policy tokens, so DDP's gradient average equals the one-process gradient. Rank 0 alone writes the log,
checkpoints' bookkeeping, budget and the saved policy. Logged losses are rank 0's share; the gradient norm is global.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rag_dpo.errors import InputError
from rag_dpo.train.common import TrainerSettings, TrainingDiverged, check_finite, is_done, load_trainable, save_policy  # noqa: F401

ALGORITHMS = ("ppo", "grpo")
REWARDS = ("outcome", "process")


@dataclass
class PPOSettings(TrainerSettings):
    algorithm: str = "ppo"              # ppo (value head + GAE) | grpo (critic-free, group-normalised rewards)
    reward: str = "outcome"             # outcome (final answer only) | process (step values + outcome)
    outcome_metric: str = "f1"          # f1 | em
    process_annotator: str = "evidence"  # annotator whose step values are the process rewards
    process_weight: float = 1.0         # scale of step rewards relative to the outcome reward
    iterations: int = 8                 # rounds of (rollouts, update)
    questions_per_iteration: int = 8
    group_size: int = 2                 # sampled chains per question per round (GRPO's group)
    ppo_epochs: int = 2                 # passes over each round's chains
    minibatch_size: int = 4             # chains per optimiser step
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 1.0                    # GAE lambda per token; 1 = the outcome reaches every step undiminished
    value_learning_rate: float = 1e-3   # the value head's own rate (a zero-initialised linear head on lr 2e-5
                                        # stays ~0 for a whole run, which turns PPO into whitened REINFORCE)
    value_max_grad_norm: float = 1.0    # the value head's gradient is clipped on its own (policy: max_grad_norm)
    temperature: float = 1.0            # rollout sampling temperature
    max_generated_tokens: int | None = None   # stop once rollouts generated this many tokens (budget)
    learning_rate: float = 2e-5


# ---- pure pieces (unit-tested) ---------------------------------------------------------------------------------

def token_rewards(n_tokens: int, step_spans: Sequence[tuple[int, int]], step_values: Sequence[float],
                  outcome: float, mode: str, process_weight: float = 1.0) -> list[float]:
    """Reward per token index: the outcome on the last policy token of the final step; with `process`, also each
    step's value on the last token of that step's own text."""
    if mode not in REWARDS:
        raise InputError(f"unknown reward {mode!r} (outcome or process)", field="trainer.reward")
    r = [0.0] * n_tokens
    spans = [(a, min(b, n_tokens)) for a, b in step_spans if a < n_tokens and b > a]
    if not spans:
        return r
    if mode == "process":
        for (a, b), v in zip(spans, step_values):
            r[b - 1] += process_weight * float(v)
    r[spans[-1][1] - 1] += float(outcome)
    return r


def reward_positions(n_tokens: int, step_spans: Sequence[tuple[int, int]], mode: str) -> list[int]:
    """Token indices a reward is placed on (same rule as `token_rewards`), whether or not it is 0: each step's
    last token in process mode, the final step's last token in outcome mode. GRPO normalises over exactly these."""
    spans = [(a, min(b, n_tokens)) for a, b in step_spans if a < n_tokens and b > a]
    if not spans:
        return []
    return [b - 1 for _, b in spans] if mode == "process" else [spans[-1][1] - 1]


def gae(rewards, values, mask, gamma: float, lam: float):
    """Advantages and returns over the masked (policy) positions of each row; unmasked positions get 0.
    Positions outside the mask are skipped, so the next policy token's value is the bootstrap across them."""
    import torch
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        idx = mask[i].nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        r, v = rewards[i, idx], values[i, idx]
        a = torch.zeros_like(r)
        last, nxt = 0.0, 0.0
        for t in range(idx.numel() - 1, -1, -1):
            delta = r[t] + gamma * nxt - v[t]
            last = delta + gamma * lam * last
            a[t] = last
            nxt = v[t]
        adv[i, idx] = a
    return adv, (adv + values) * mask


def _normalise_in_groups(x, positions, groups: Sequence[Any], eps: float):
    """(x - mean) / std per group over the marked positions of the group's rows; 0 elsewhere."""
    import torch
    norm = torch.zeros_like(x)
    by_group: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for rows in by_group.values():
        vals = [x[i][positions[i]] for i in rows]
        allv = torch.cat(vals) if vals else torch.zeros(0)
        if not allv.numel():
            continue
        mean, std = allv.mean(), allv.std(unbiased=False)
        for i in rows:
            p = positions[i]
            norm[i][p] = (x[i][p] - mean) / (std + eps)
    return norm


def group_advantages(rewards, mask, groups: Sequence[Any], positions=None, step_values=None,
                     process_weight: float = 1.0, eps: float = 1e-6):
    """GRPO: normalise rewards within each question's group, then advantage = reward-to-go of the normalised
    rewards over policy positions.

    `positions` ([B, T] 0/1) marks where rewards were placed, including rewards that are 0 (a step the annotator
    valued 0 must come out below its siblings, not stay at 0). Without it: the nonzero rewards plus each row's
    last policy token (where the outcome sits even when it is 0).

    Process mode (`step_values`: each step's unweighted value at its reward position): the outcome (rewards minus
    the weighted step values, at each row's last position) is normalised over the group's chains and the step
    values over all the group's step positions, separately, then summed with `process_weight`. Normalising their
    sum instead would rank every intermediate step below the final ones, which carry the outcome too."""
    import torch
    if positions is None:
        positions = (rewards != 0) & mask.bool()
    positions = positions.bool() & mask.bool()
    last = torch.zeros_like(positions)
    for i in range(rewards.shape[0]):
        idx = mask[i].nonzero(as_tuple=True)[0]
        if idx.numel():
            last[i, idx[-1]] = True
    if step_values is None:
        norm = _normalise_in_groups(rewards, positions | last, groups, eps)
    else:
        outcome = rewards - process_weight * step_values
        norm = (_normalise_in_groups(outcome, last, groups, eps)
                + process_weight * _normalise_in_groups(step_values, positions, groups, eps))
    flipped = (norm * mask).flip(-1).cumsum(-1).flip(-1)
    return flipped * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(new_logp, old_logp, adv, mask, clip: float):
    ratio = (new_logp - old_logp).exp()
    pg = torch_max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return masked_mean(pg, mask), masked_mean(((ratio - 1).abs() > clip).float(), mask)


def value_loss(new_v, old_v, returns, mask, clip: float):
    clipped = old_v + (new_v - old_v).clamp(-clip, clip)
    return 0.5 * masked_mean(torch_max((new_v - returns) ** 2, (clipped - returns) ** 2), mask)


def torch_max(a, b):
    import torch
    return torch.maximum(a, b)


def kl_k3(logp, ref_logp):
    """Per-token KL(pi || ref) estimator k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return d.exp() - d - 1


# ---- model pieces ----------------------------------------------------------------------------------------------

def forward_logps(model, value_head, input_ids, attention_mask, with_values: bool = True, only=None):
    """(log-prob of each next token, value before it), both [B, T-1], index j <-> token j+1.

    With `only` (a [B, T-1] mask, the policy tokens) the LM head and the vocabulary softmax run on those positions
    alone and the other log-probs are 0: every loss is masked to the policy tokens, and on a chain that is mostly
    prompt and retrieved text the full-vocabulary logits are most of the memory and a large share of the time."""
    import torch
    # a DDP/DeepSpeed wrapper (`.module`) must see the whole forward call for its gradient hooks: full path there
    direct = only is not None and not hasattr(model, "module") and hasattr(model, "get_decoder")
    head = model.get_output_embeddings() if direct else None
    decoder = model.get_decoder() if head is not None else None
    if decoder is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_values,
                    use_cache=False)
        logits = out.logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        h = out.hidden_states[-1][:, :-1] if with_values else None
    else:
        h = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
        sel = only.bool()
        picked = torch.log_softmax(head(h[sel]).float(), -1).gather(-1, input_ids[:, 1:][sel][:, None]).squeeze(-1)
        logp = torch.zeros(sel.shape, dtype=picked.dtype, device=picked.device).masked_scatter(sel, picked)
    values = None
    if with_values and value_head is not None:
        # detached: the value loss trains the head, never the policy's weights (its gradient is clipped apart)
        dtype = next(value_head.parameters()).dtype   # (a DDP-wrapped head has no .weight of its own)
        values = value_head(h.detach().to(dtype)).squeeze(-1).float()
    return logp, values


@dataclass
class Rollouts:
    """One round's chains as padded tensors (shifted: index j is token j+1)."""
    input_ids: Any
    attention_mask: Any
    mask: Any              # policy tokens (actions)
    rewards: Any           # env rewards per token (before KL)
    groups: list
    outcomes: list[float]
    n_policy_tokens: int
    positions: Any = None  # 1 where a reward was placed (even a 0 one): GRPO normalises over these
    step_values: Any = None  # process mode: each step's unweighted value at its last token (GRPO normalises apart)


def chains_to_rollouts(tokenizer, chains, rewards_per_chain: list[list[float]] | None, cfg: PPOSettings,
                       step_values: list[list[float]] | None = None, outcomes: list[float] | None = None) -> Rollouts:
    """Tokenise each chain's selected path with protocol.tokenize_path and place its rewards."""
    import torch

    from rag_dpo.agent.protocol import tokenize_path
    from rag_dpo.metrics import exact_match, f1_score
    seqs, masks, rews, groups, outs, places, svals = [], [], [], [], [], [], []
    for i, c in enumerate(chains):
        path = c.path()
        tp = tokenize_path(tokenizer, c.question, path)
        ids, pm = tp.input_ids[: cfg.max_length], tp.policy_mask[: cfg.max_length]
        if outcomes is not None:
            outcome = outcomes[i]
        else:
            ans = path[-1].answer if path and path[-1].answer is not None else None
            metric = f1_score if cfg.outcome_metric == "f1" else exact_match
            outcome = float(metric(ans, c.gold_answers)) if ans is not None else 0.0
        values = step_values[i] if step_values is not None else [
            (s.labels[cfg.process_annotator].value if cfg.process_annotator in s.labels else 0.0) for s in path]
        r = token_rewards(len(ids), tp.step_spans, values, outcome, cfg.reward, cfg.process_weight)
        places.append(reward_positions(len(ids), tp.step_spans, cfg.reward))
        svals.append(token_rewards(len(ids), tp.step_spans, values, 0.0, "process") if cfg.reward == "process"
                     else None)
        seqs.append(ids), masks.append(pm), rews.append(r), groups.append(c.question_id), outs.append(outcome)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    m = torch.zeros((len(seqs), width))
    rw = torch.zeros((len(seqs), width))
    pos = torch.zeros((len(seqs), width))
    sv = torch.zeros((len(seqs), width)) if cfg.reward == "process" else None
    for i, (s, pm, r) in enumerate(zip(seqs, masks, rews)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        m[i, : len(s)] = torch.tensor(pm, dtype=torch.float)
        rw[i, : len(s)] = torch.tensor(r)
        pos[i, places[i]] = 1.0
        if sv is not None:
            sv[i, : len(s)] = torch.tensor(svals[i])
    return Rollouts(ids, att, m[:, 1:], rw[:, 1:], groups, outs, int(m.sum()), pos[:, 1:],
                    sv[:, 1:] if sv is not None else None)


class PPOTrainer:
    """Holds policy (+ value head), reference and optimiser; `update(rollouts)` runs one PPO/GRPO round."""

    def __init__(self, cfg: PPOSettings, model: str = "smollm2", policy=None, tokenizer=None):
        import torch
        from accelerate import Accelerator

        from rag_dpo.train.common import use_bf16
        if cfg.algorithm not in ALGORITHMS:
            raise InputError(f"unknown algorithm {cfg.algorithm!r} (ppo or grpo)", field="trainer.algorithm")
        if cfg.reward not in REWARDS:
            raise InputError(f"unknown reward {cfg.reward!r} (outcome or process)", field="trainer.reward")
        self.cfg, self.spec = cfg, model
        torch.manual_seed(cfg.seed)
        if policy is None:
            policy, tokenizer, peft_cfg = load_trainable(model, cfg)
            if peft_cfg is not None:
                from peft import get_peft_model
                policy = get_peft_model(policy, peft_cfg)
        self.ref_adapter: str | None = None
        self.ref_model = None
        if hasattr(policy, "peft_config"):
            if "ref" not in policy.peft_config and self._continued(policy):
                policy.add_adapter("ref", policy.peft_config["default"])
                for name, p in policy.named_parameters():
                    if ".default." in name:
                        policy.get_parameter(name.replace(".default.", ".ref.")).data.copy_(p.data)
                policy.set_adapter("default")
            self.ref_adapter = "ref" if "ref" in policy.peft_config else None
        else:
            import copy
            self.ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
        self.tok = tokenizer
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad]}]
        if cfg.algorithm == "ppo":
            groups.append({"params": list(self.value_head.parameters()), "lr": cfg.value_learning_rate})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.accelerator = Accelerator(mixed_precision="bf16" if use_bf16(cfg.precision) else "no",
                                       cpu=not torch.cuda.is_available())
        from accelerate.utils import DistributedType
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:   # one engine per model there
            raise InputError("the PPO loop trains policy and value head as DDP, not DeepSpeed: launch PPO recipes with "
                             "torchrun or a non-DeepSpeed accelerate config (docs/scaling.md)", field="method")
        self.policy, self.value_head, self.optimizer = self.accelerator.prepare(policy, self.value_head,
                                                                                self.optimizer)
        self.iteration = 0

    def _clip(self, params, max_norm: float) -> float:
        """Clip this group's gradient to its own norm; returns the norm before clipping (inf if non-finite)."""
        import torch
        params = [p for p in params if p.grad is not None]
        if not params:
            return 0.0
        if max_norm:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))

    @staticmethod
    def _continued(policy) -> bool:
        """A loaded adapter (not freshly initialised): its LoRA B matrices are not all zero."""
        return any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n and ".default." in n)

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        from rag_dpo.distributed import rank, world_size
        return rank(), world_size()

    @staticmethod
    def _width(att, rows) -> int:
        """Columns the given rows need: their longest sequence (rows are right-padded)."""
        return max(2, int(att[rows].sum(-1).max()))

    def ref_logps(self, ids, att, only=None):
        import torch
        with torch.no_grad(), self.accelerator.autocast():
            if self.ref_model is not None:
                return forward_logps(self.ref_model, None, ids, att, with_values=False, only=only)[0]
            from trl.trainer.utils import use_adapter
            model = self.unwrapped()
            with use_adapter(model, self.ref_adapter):
                logp = forward_logps(model, None, ids, att, with_values=False, only=only)[0]
            model.set_adapter("default")
            return logp

    def update(self, ro: Rollouts) -> dict[str, float]:
        """One round: old/ref log-probs, advantages, then ppo_epochs x minibatches of clipped updates."""
        import torch
        cfg, dev = self.cfg, self.accelerator.device
        ids, att, mask, rew = (t.to(dev) for t in (ro.input_ids, ro.attention_mask, ro.mask, ro.rewards))
        use_critic = cfg.algorithm == "ppo"
        self.policy.eval()
        # The no-grad passes go minibatch by minibatch too (a whole round's attention at once set the memory peak),
        # over rows sorted by length, each minibatch cut to its longest row: rows are right-padded to the round's
        # longest chain, and causal attention makes the trailing padding pure waste.
        n, step = ids.shape[0], max(1, cfg.minibatch_size)
        by_len = torch.argsort(att.sum(-1))
        old_logp, ref_logp = torch.zeros_like(mask), torch.zeros_like(mask)
        old_v = torch.zeros_like(mask) if use_critic else None
        # several ranks: minibatches dealt round them (no gradients, so the unwrapped modules: no DDP collective),
        # each rank's rows summed into the others' zeros
        rank, world = self._rank_world()
        policy = self.unwrapped() if world > 1 else self.policy
        head = self.accelerator.unwrap_model(self.value_head) if use_critic else None
        for b in range(step * rank, n, step * world):
            rows = by_len[b:b + step]
            w = self._width(att, rows)
            rows_ids, rows_att, cut = ids[rows, :w], att[rows, :w], (rows, slice(0, w - 1))
            with torch.no_grad(), self.accelerator.autocast():
                lp, v = forward_logps(policy, head, rows_ids, rows_att, with_values=use_critic, only=mask[cut])
            old_logp[cut] = lp
            if use_critic:
                old_v[cut] = v
            ref_logp[cut] = self.ref_logps(rows_ids, rows_att, only=mask[cut])
        if world > 1:
            from rag_dpo.distributed import all_reduce_sum
            for t in (old_logp, ref_logp, old_v):
                if t is not None:
                    all_reduce_sum(t, "PPO log-probs")
        kl = (old_logp - ref_logp) * mask
        if use_critic:
            shaped = rew - cfg.kl_coef * kl
            adv, returns = gae(shaped, old_v * mask, mask, cfg.gamma, cfg.lam)
            sel = mask.bool()
            if sel.sum() > 1:
                adv = (adv - adv[sel].mean()) / (adv[sel].std() + 1e-8) * mask
        else:
            pos = ro.positions.to(dev) if ro.positions is not None else None
            sv = ro.step_values.to(dev) if ro.step_values is not None else None
            adv, returns = group_advantages(rew, mask, ro.groups, pos, sv, cfg.process_weight), None
        round_no = self.iteration + 1
        check_finite(round_no, "PPO round", kl=float(kl.sum()))
        self.policy.train()
        stats: dict[str, list[float]] = {"pg_loss": [], "vf_loss": [], "kl_loss": [], "clip_frac": [], "loss": [],
                                         "grad_norm": [], "value_grad_norm": [], "entropy_proxy": []}
        g = torch.Generator().manual_seed(cfg.seed + self.iteration)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=g)
            for b in range(0, n, cfg.minibatch_size):
                rows = order[b:b + cfg.minibatch_size].to(dev)
                share = 1.0
                if world > 1:   # this rank's rows of the minibatch, weighted by its share of the policy tokens
                    everyone = rows
                    rows = everyone[rank::world]
                    if not rows.numel():    # every rank must take part in DDP's gradient all-reduce
                        rows, share = everyone[:1], 0.0
                    w_all = self._width(att, everyone)
                    total = float(mask[everyone, : w_all - 1].sum())
                    share *= world * float(mask[rows, : self._width(att, rows) - 1].sum()) / max(total, 1.0)
                w = self._width(att, rows)
                cut = (rows, slice(0, w - 1))    # the minibatch's positions, trailing padding dropped
                m = mask[cut]
                with self.accelerator.autocast():
                    logp, v = forward_logps(self.policy, self.value_head if use_critic else None, ids[rows, :w],
                                            att[rows, :w], with_values=use_critic, only=m)
                pg, clip_frac = policy_loss(logp, old_logp[cut], adv[cut], m, cfg.clip_range)
                loss = pg
                vf = torch.zeros(())
                kl_term = torch.zeros(())
                if use_critic:
                    vf = value_loss(v, old_v[cut], returns[cut], m, cfg.value_clip)
                    loss = loss + cfg.vf_coef * vf
                else:
                    kl_term = masked_mean(kl_k3(logp, ref_logp[cut]), m)
                    loss = loss + cfg.kl_coef * kl_term
                if world == 1:   # several ranks: a rank's own loss stays local; the global gradient norm below
                    check_finite(round_no, "PPO round", loss=float(loss.detach()))   # stops every rank at once
                self.optimizer.zero_grad()
                self.accelerator.backward(loss * share if world > 1 else loss)
                gnorm = self._clip(self.optimizer.param_groups[0]["params"], cfg.max_grad_norm)
                vnorm = (self._clip(self.optimizer.param_groups[1]["params"], cfg.value_max_grad_norm)
                         if use_critic else 0.0)
                check_finite(round_no, "PPO round", grad_norm=gnorm, value_grad_norm=vnorm)
                self.optimizer.step()
                # -mean log-prob of the sampled tokens: a Monte-Carlo entropy estimate (collapse shows as ~0)
                ent = -masked_mean(logp.detach(), m)
                for k, val in (("pg_loss", pg), ("vf_loss", vf), ("kl_loss", kl_term), ("clip_frac", clip_frac),
                               ("loss", loss), ("entropy_proxy", ent)):
                    stats[k].append(float(val.detach()))
                stats["grad_norm"].append(gnorm)
                stats["value_grad_norm"].append(vnorm)
        self.iteration += 1
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out["kl"] = float(kl.sum() / mask.sum().clamp(min=1))
        out["reward"] = float((rew * mask).sum(-1).mean())
        out["outcome"] = sum(ro.outcomes) / max(len(ro.outcomes), 1)
        return out

    # ---- checkpoints (accelerate state: model, value head, optimiser, RNG) ------------------------------------
    def save_checkpoint(self, ckpt_root: Path) -> Path:
        import shutil
        from rag_dpo.distributed import barrier, is_main
        d = ckpt_root / f"iter-{self.iteration}"
        self.accelerator.save_state(str(d))     # every rank (its RNG state); accelerate writes weights on rank 0
        barrier("PPO checkpoint")               # the folder is whole before it is marked done
        if is_main():
            (d / "iteration.json").write_text(json.dumps({"iteration": self.iteration}))
            for old in ckpt_root.glob("iter-*"):
                if old != d and (old / "iteration.json").exists():
                    shutil.rmtree(old)
        barrier("PPO checkpoint")
        return d

    def load_checkpoint(self, ckpt_root: Path) -> bool:
        done = sorted((p for p in ckpt_root.glob("iter-*") if (p / "iteration.json").exists()),
                      key=lambda p: int(p.name.split("-")[1]))
        if not done:
            return False
        self.accelerator.load_state(str(done[-1]))
        self.iteration = json.loads((done[-1] / "iteration.json").read_text())["iteration"]
        return True


@dataclass
class PPOInputs:
    """What PPO needs besides the policy: questions to roll out on, and the environment."""
    questions: list                       # rag_dpo.records.Question (train split)
    corpus: Any
    retriever: Any
    rollout: dict[str, Any] = field(default_factory=dict)   # RolloutConfig fields (k, max_steps, max_new_tokens, ...)
    annotator: Any = None                 # Annotator for process rewards (built from process_annotator if None)


@contextmanager
def merged_lora(model):
    """Generate with the active LoRA adapter merged into the base weights (1.13x faster PPO rollouts on a 2-core CPU,
    `bench/ppo_bench.py --merge`), then unmerge before the update; a full fine-tune (no adapter) is left alone."""
    merge = hasattr(model, "peft_config") and hasattr(model, "merge_adapter")
    if merge:
        model.merge_adapter()
    try:
        yield model
    finally:
        if merge:
            model.unmerge_adapter()


class _TimedRetriever:
    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0
        self.name = getattr(inner, "name", type(inner).__name__)

    def search(self, queries, k):
        t = time.perf_counter()
        try:
            return self.inner.search(queries, k)
        finally:
            self.seconds += time.perf_counter() - t


def train_ppo(cfg: PPOSettings, inputs: PPOInputs, out_dir: str | Path, model: str = "smollm2",
              trainer: PPOTrainer | None = None) -> Path:
    """Online multi-turn PPO/GRPO: `iterations` rounds of (sample group_size chains for questions_per_iteration
    train questions, reward them, update). Saves adapter + tokenizer + value head, train_log.jsonl, budget.json,
    timings; resumable from out_dir/checkpoints (one accelerate state per finished round)."""
    import random

    from tqdm.auto import tqdm

    from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
    from rag_dpo.distributed import barrier, is_main
    from rag_dpo.io import append_jsonl, atomic_write_json
    from rag_dpo.train.common import plot_curves

    out_dir = Path(out_dir)
    if is_done(out_dir):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if not inputs.questions:
        raise InputError("PPO needs at least one training question", field="questions")
    tr = trainer or PPOTrainer(cfg, model)
    ckpt_root = out_dir / "checkpoints"
    log_path = out_dir / "train_log.jsonl"
    budget_path = out_dir / "budget.json"
    budget = {"rollouts": 0, "generated_tokens": 0, "policy_steps": 0, "questions": 0, "question_ids": []}
    if tr.load_checkpoint(ckpt_root) and budget_path.exists():
        budget = json.loads(budget_path.read_text())
    annotator = inputs.annotator
    if cfg.reward == "process" and annotator is None:
        from rag_dpo.annotate.annotators import build_annotator
        annotator = build_annotator(cfg.process_annotator)
    retriever = _TimedRetriever(inputs.retriever)
    rcfg = RolloutConfig(**{**inputs.rollout, "do_sample": True, "temperature": cfg.temperature, "progress": False})
    engine = RolloutEngine(tr.unwrapped(), tr.tok, retriever, inputs.corpus, rcfg, model_name=str(model))
    rng = random.Random(cfg.seed)
    order = list(inputs.questions)
    rng.shuffle(order)
    times = {"rollout_s": 0.0, "retrieval_s": 0.0, "update_s": 0.0}
    seen: set[str] = set(budget.get("question_ids", []))
    by_tokens = bool(cfg.max_generated_tokens)   # under a token budget the rounds needed are unknown: count tokens
    bar = tqdm(total=cfg.max_generated_tokens if by_tokens else cfg.iterations,
               initial=min(budget["generated_tokens"], cfg.max_generated_tokens) if by_tokens else tr.iteration,
               desc=f"{cfg.algorithm} ({cfg.reward})", unit="tok" if by_tokens else "round", disable=not is_main())
    try:
        while tr.iteration < cfg.iterations:
            if cfg.max_generated_tokens and budget["generated_tokens"] >= cfg.max_generated_tokens:
                break
            start = (tr.iteration * cfg.questions_per_iteration) % len(order)
            n_q = min(cfg.questions_per_iteration, len(order))
            if cfg.max_generated_tokens and budget["rollouts"]:
                # the last round shrinks to what the budget has left, so PPO lands near the cap, not a round past it
                per_chain = budget["generated_tokens"] / budget["rollouts"]
                left = cfg.max_generated_tokens - budget["generated_tokens"]
                n_q = max(1, min(n_q, round(left / (per_chain * cfg.group_size))))
            qs = [order[(start + j) % len(order)] for j in range(n_q)]
            t0 = time.perf_counter()
            r0 = retriever.seconds
            tr.policy.eval()
            with merged_lora(tr.unwrapped()):
                # the whole group in one batch: on a CPU a wider batch generates more tokens/s
                # (`bench/ppo_bench.py --group-batch`, numbers in the README)
                engine.cfg.seed = cfg.seed * 1_000_003 + tr.iteration * 1009
                engine.clear_cache()        # the weights changed since the last round: stored keys/values are stale
                # several ranks: each rolls out its share of the questions, every rank gets the whole round
                chains, gen = sharded_rollout(engine, qs, cfg.group_size,
                                              annotator if cfg.reward == "process" else None)
            t1 = time.perf_counter()
            ro = chains_to_rollouts(tr.tok, chains, None, cfg)
            stats = tr.update(ro)
            t2 = time.perf_counter()
            budget["rollouts"] += len(chains)
            budget["generated_tokens"] += gen
            budget["policy_steps"] += sum(len(c.steps) for c in chains)
            seen.update(q.id for q in qs)
            budget["questions"], budget["question_ids"] = len(seen), sorted(seen)
            rs = retriever.seconds - r0
            times["rollout_s"] += t1 - t0 - rs
            times["retrieval_s"] += rs
            times["update_s"] += t2 - t1
            row = {"step": tr.iteration, **stats, "generated_tokens": gen, "trained_tokens": ro.n_policy_tokens,
                   "rollout_s": t1 - t0 - rs, "retrieval_s": rs, "update_s": t2 - t1}
            if is_main():
                append_jsonl(log_path, [row])
                _wandb_log({f"ppo/{k}": v for k, v in row.items()})
            tr.save_checkpoint(ckpt_root)
            if is_main():
                atomic_write_json(budget_path, budget)
            bar.update(min(gen, max(0, bar.total - bar.n)) if by_tokens else 1)
            bar.set_postfix(round=tr.iteration, reward=f"{stats['reward']:.3f}", outcome=f"{stats['outcome']:.3f}", kl=f"{stats['kl']:.3f}")
    finally:
        bar.close()
    if not is_main():   # rank 0 alone writes the trained folder; the others wait for it
        barrier("saving the PPO policy")
        return out_dir
    save_policy(tr.unwrapped(), tr.tok, out_dir, model)
    from safetensors.torch import save_file
    vh = tr.accelerator.unwrap_model(tr.value_head)
    save_file({k: v.detach().cpu().contiguous() for k, v in vh.state_dict().items()}, str(out_dir / "value_head.safetensors"))
    history = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    plot_curves(history, ["reward", "outcome", "kl", "pg_loss", "vf_loss", "entropy_proxy"], out_dir / "train_curves.png",
                f"{cfg.algorithm.upper()} ({cfg.reward} reward)")
    atomic_write_json(budget_path, budget)
    from rag_dpo.train.common import health
    signs = health(history, kl_key="kl", entropy_keys=("entropy_proxy",))
    for flag in signs["flags"]:
        print(f"[rag-dpo] warning: {out_dir.name}: {flag}", flush=True)
    atomic_write_json(out_dir / "train_done.json", {"global_step": tr.iteration, **times, "health": signs,
                                                    **{k: v for k, v in budget.items() if k != "question_ids"}})
    barrier("saving the PPO policy")
    return out_dir


def sharded_rollout(engine, questions: Sequence, samples: int, annotator=None) -> tuple[list, int]:
    """`engine.rollout(questions, samples)` (annotated with `annotator` when given) and the tokens it generated.
    Under a multi-process launch each rank rolls out `questions[rank::world]` (all samples of a question on one
    rank), and every rank gets every rank's chains back in the one-process order (sample-major) and the total
    generated tokens."""
    from rag_dpo.distributed import gather_objects, rank, world_size
    world = world_size()
    tok0 = engine.stats["generated_tokens"]
    if world == 1:
        chains = engine.rollout(questions, samples=samples)
        if annotator is not None:
            annotator.annotate(chains)
        return chains, engine.stats["generated_tokens"] - tok0
    r = rank()
    mine = list(questions[r::world])
    local = engine.rollout(mine, samples=samples) if mine else []
    if annotator is not None and local:
        annotator.annotate(local)
    # local position p: sample p // len(mine) of mine[p % len(mine)], which is questions[r + world * (p % len(mine))]
    keyed = [((p // len(mine), r + world * (p % len(mine))), c) for p, c in enumerate(local)]
    everyone = gather_objects([(keyed, engine.stats["generated_tokens"] - tok0)], "PPO rollouts")
    chains = [c for _, c in sorted((kc for part, _ in everyone for kc in part), key=lambda kc: kc[0])]
    return chains, sum(g for _, g in everyone)


def _wandb_log(data: dict) -> None:
    """Log into the run the pipeline opened (if any); tracking.log never lets a wandb failure stop training."""
    import wandb

    from rag_dpo import tracking
    tracking.log(wandb.run, data)
