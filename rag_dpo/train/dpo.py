"""DPO on step-level or outcome-level preference pairs through TRL's DPOTrainer.

Rows are `{prompt, chosen, rejected}`. Step-level pairs share a prefix (the prompt is `render_context` of it) and
their completions are single steps; outcome-level completions are whole chains that contain retrieved text.
TRL's DPOTrainer scores every completion token, so `MaskedDPOTrainer` is a minimal subclass: rows arrive
pre-tokenised with per-token `chosen_mask` / `rejected_mask` (0 on retrieved tokens), and its collator multiplies
TRL's `completion_mask` by them. Every loss TRL computes from `completion_mask` (sigmoid, IPO, the `sft`/NLL term,
...) then skips retrieved text; the reference log-probs (precomputed once by default) use the same mask.

`nll_weight > 0` adds TRL's `sft` loss on the chosen completion (RPO-style), which keeps the shared format of
step pairs from being dragged down with the rejected step. `loss_type` takes any TRL loss: `ipo` (TRL normalises
it per token, so long and short completions weigh alike) and `sigmoid_norm` (length-normalised DPO) are the ones
to try when chosen and rejected differ in length, e.g. a short answer step against a long search step.

Diagnostics (why step-DPO lowered search): before training, `pair_stats` records the action mix of chosen vs
rejected (how many pairs prefer answering over searching), their lengths and how near-identical they are; after
training, `common.health` reads TRL's logged rewards/logps for likelihood displacement (chosen and rejected both
pushed below the reference). Both go into train_done.json; `max_pair_similarity` < 1 drops near-identical pairs
(a pair whose two steps differ in a word or two teaches the shared text nothing but noise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from rag_dpo.errors import InputError
from rag_dpo.train.common import (ChainTokenizer, TrainerSettings, check_columns, divergence_guard, finish_training,
                                  hf_args, is_done, last_checkpoint, load_dataset_dir, load_trainable,
                                  self_eval_extra)


@dataclass
class DPOSettings(TrainerSettings):
    beta: float = 0.1                        # strength of the implicit KL to the reference policy
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])   # TRL loss types, summed
    loss_weights: list[float] | None = None  # one weight per loss_type (default 1 each)
    nll_weight: float = 0.0                  # > 0: add an NLL term on the chosen completion with this weight (RPO)
    precompute_ref_log_probs: bool = True    # one reference pass before training instead of one per step
    max_pair_similarity: float = 1.0         # drop pairs whose chosen/rejected texts are at least this similar
                                             # (difflib ratio; 1.0 keeps every pair)
    self_eval: bool = False                  # also learn <score>D</score> after chosen and rejected (self_eval.py)
    self_eval_weight: float = 0.5            # weight of that NLL term (outside every DPO loss)
    self_eval_pool_rows: int = 0             # with self_eval: then train the score alone on up to this many labelled
                                             # pool steps per question (self_eval.train_score_stage); 0 = off
    share_prompt: bool = True                # encode a pair's prompt once for its chosen and rejected rows
                                             # (SharedPromptForward; the same loss up to float rounding)


def _action(text: str) -> str:
    """The action of a single-step completion (search | answer | invalid), as the agent's parser reads it."""
    from rag_dpo.agent.protocol import parse_step
    return parse_step(text).action


def similarity(a: str, b: str) -> float:
    import difflib
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def pair_stats(dataset) -> dict:
    """What a pairs dataset teaches: `actions` = counts of "chosen>rejected" action kinds (step pairs) or of
    chains with fewer/more/equal steps (outcome pairs), `answer_over_search` = pairs whose chosen completion answers
    where the rejected one searches (or, for whole chains, stops earlier), mean character lengths and difflib
    similarity of chosen vs rejected, and how many pairs are near-identical (similarity >= 0.9)."""
    from collections import Counter
    cols = set(dataset.column_names)
    n = len(dataset)
    if n == 0:
        return {"rows": 0}
    actions: Counter = Counter()
    early = 0
    sims, clen, rlen = [], [], []
    for r in dataset:
        c, j = r["chosen"], r["rejected"]
        sims.append(similarity(c, j))
        clen.append(len(c)), rlen.append(len(j))
        if "chosen_steps" in cols:
            cs, rs = int(r["chosen_steps"]), int(r["rejected_steps"])
            key = "fewer steps" if cs < rs else "more steps" if cs > rs else "same steps"
            actions[key] += 1
            early += cs < rs
        else:
            ca = r.get("chosen_action") or _action(c)
            ra = r.get("rejected_action") or _action(j)
            actions[f"{ca}>{ra}"] += 1
            early += ca == "answer" and ra == "search"
    return {"rows": n, "actions": dict(sorted(actions.items())), "answer_over_search": early,
            "chosen_chars": sum(clen) / n, "rejected_chars": sum(rlen) / n, "similarity": sum(sims) / n,
            "near_identical": sum(1 for x in sims if x >= 0.9)}


def drop_similar(dataset, max_similarity: float):
    """The pairs whose chosen and rejected texts are less similar than `max_similarity` (1.0: all of them)."""
    if max_similarity >= 1.0:
        return dataset
    return dataset.filter(lambda r: similarity(r["chosen"], r["rejected"]) < max_similarity,
                          desc="dropping near-identical pairs")


def tokenize_pairs(dataset, tokenizer, where: str = "pairs dataset"):
    """{prompt, chosen, rejected} -> prompt_ids, chosen_ids, rejected_ids and per-token chosen/rejected masks."""
    check_columns(dataset, ("prompt", "chosen", "rejected"), where)
    ct = ChainTokenizer(tokenizer)

    def encode(row):
        c, cm = ct.completion(row["chosen"], row.get("chosen_info_spans"), row.get("chosen_ends_turn"))
        r, rm = ct.completion(row["rejected"], row.get("rejected_info_spans"), row.get("rejected_ends_turn"))
        return {"prompt_ids": ct.prompt(row["prompt"]), "chosen_ids": c, "rejected_ids": r,
                "chosen_mask": cm, "rejected_mask": rm}

    out = dataset.map(encode, remove_columns=dataset.column_names, desc="tokenising pairs")
    for i, row in enumerate(out):
        if not any(row["chosen_mask"]) or not any(row["rejected_mask"]):
            raise InputError("a completion has no policy tokens (only retrieved text)", file=where, record=i,
                             field="chosen" if not any(row["chosen_mask"]) else "rejected")
    return out


def _masked_collator_cls():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class MaskedPreferenceCollator(DataCollatorForPreference):
        """TRL's preference collator, with completion_mask zeroed where chosen_mask/rejected_mask are 0."""

        def torch_call(self, examples):
            out = super().torch_call(examples)
            out["completion_mask"] = out["completion_mask"] * self.per_token(examples, "mask", out["completion_mask"])
            return out

        def per_token(self, examples, column: str, like):
            """The rows' `chosen_<column>` then `rejected_<column>` token flags laid out (prompt as 0, truncated
            as the collator truncates) in a tensor shaped like `like` (the completion_mask)."""
            import torch
            rows = [[0] * len(e["prompt_ids"]) + list(e[f"chosen_{column}"]) for e in examples]
            rows += [[0] * len(e["prompt_ids"]) + list(e[f"rejected_{column}"]) for e in examples]
            if self.max_length is not None:
                sl = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
                rows = [r[sl] for r in rows]
            flags = torch.zeros_like(like)
            for i, r in enumerate(rows):
                flags[i, : len(r)] = torch.tensor(r[:like.shape[1]], dtype=flags.dtype)
            return flags

    return MaskedPreferenceCollator


class SharedPromptForward:
    """Stands in for the policy in TRL's DPO forward (`model(input_ids, attention_mask, labels, fused_lm_head=True)`
    on rows [chosen..., rejected...]). Why: the two rows of a pair begin with the same prompt -- for a step pair a
    context of ~500 tokens before a ~30-token step -- and TRL encodes it twice, in the policy's forward and
    backward and in the reference pass. Here the tokens both rows share go through the model once (batch 1), their
    keys/values are repeated to the two rows, and only each row's own tokens are encoded after them; gradients
    reach the shared part through both rows, as they do through the two copies. Returns what TRL's fused head
    returns (per-token log_probs, entropy, mean_logits, is_top1; zeros where the label is ignored), equal to it up
    to float rounding. Calls it cannot serve (no fused head, other inputs) go to the model unchanged."""

    KEYS = {"input_ids", "attention_mask", "use_cache"}

    def __init__(self, model, causal_lm):
        self.model, self.lm = model, causal_lm

    def __call__(self, *args, fused_lm_head: bool = False, labels=None, **kw):
        if args or not fused_lm_head or labels is None or set(kw) - self.KEYS or kw["input_ids"].size(0) % 2:
            return self.model(*args, fused_lm_head=fused_lm_head, labels=labels, **kw)
        import torch
        ids, att = kw["input_ids"], kw.get("attention_mask")
        att = torch.ones_like(ids) if att is None else att
        n = ids.size(0) // 2
        rows = [None] * (2 * n)
        for i in range(n):
            rows[i], rows[i + n] = self.pair_hidden(ids[[i, i + n]], att[[i, i + n]])
        width = ids.size(1)
        hidden = torch.stack([torch.nn.functional.pad(h, (0, 0, 0, width - h.size(0))) for h in rows])
        return self.head(hidden[:, :-1], labels[:, 1:])

    def pair_hidden(self, ids, att):
        """Last hidden states of a pair's two rows (each its own length), their common leading tokens encoded once."""
        import torch
        from transformers.cache_utils import DynamicCache

        from rag_dpo.agent.kv_cache import cache_kwarg
        lens = [int(a.sum()) for a in att]
        common = min(lens)
        differ = (ids[0, :common] != ids[1, :common]).nonzero()
        shared = min(int(differ[0]) if len(differ) else common, common - 1)   # each row keeps a token of its own
        backbone = self.lm.base_model
        if shared < 1:
            out = backbone(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
            return out[0, :lens[0]], out[1, :lens[1]]
        kw = cache_kwarg(self.lm)
        cache = DynamicCache(config=self.lm.config)
        head = backbone(input_ids=ids[:1, :shared], use_cache=True, **{kw: cache}).last_hidden_state
        cache.batch_repeat_interleave(2)
        end = max(lens)
        tail_mask = torch.cat([att.new_ones(2, shared), att[:, shared:end]], dim=1)
        tail = backbone(input_ids=ids[:, shared:end], attention_mask=tail_mask, use_cache=True,
                        **{kw: cache}).last_hidden_state
        return [torch.cat([head[0], tail[r]])[:lens[r]] for r in (0, 1)]

    CHUNK = 256     # positions per slice of the LM head: its [positions, vocab] log-softmax is recomputed in
                    # backward, not kept, as TRL's fused head does (a whole chain x 150k vocabulary is GBs)

    def head(self, hidden, labels):
        """TRL's fused-head outputs at the positions whose label is not -100 (temperature 1, no soft-capping)."""
        import torch
        from torch.utils.checkpoint import checkpoint
        from types import SimpleNamespace
        mask = labels != -100
        lm_head = self.lm.get_output_embeddings()
        h, target = hidden[mask], labels[mask]
        picked, entropy, mean_logits, top1 = [], [], [], []
        for i in range(0, len(target), self.CHUNK):
            parts = checkpoint(_head_slice, h[i:i + self.CHUNK], lm_head.weight, lm_head.bias,
                               target[i:i + self.CHUNK], use_reentrant=False)
            for out, x in zip((picked, entropy, mean_logits, top1), parts):
                out.append(x)

        def spread(parts, like):        # `like[:0]`: an empty batch stays connected to the graph, as in TRL
            x = torch.cat(parts) if parts else like[:0]
            return x.new_zeros(mask.shape).masked_scatter(mask, x)
        return SimpleNamespace(log_probs=spread(picked, h[:, 0]), entropy=spread(entropy, h[:, 0].detach()),
                               mean_logits=spread(mean_logits, h[:, 0].detach()),
                               is_top1=spread(top1, target.bool()), log_sum_sq_probs=None, aux_loss=None)


def _head_slice(hidden, weight, bias, target):
    """One slice of SharedPromptForward.head from one LM-head pass: log p(target) (with grad) and, detached, TRL's
    metrics (entropy, mean logit, target is top-1)."""
    import torch
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, target[:, None]).squeeze(-1)
    with torch.no_grad():
        return (picked, -(logp.exp() * logp).sum(-1), logits.mean(-1), logits.argmax(-1) == target)


def share_prompt_forward(trainer, model):
    """`model` wrapped in SharedPromptForward where that gives TRL's numbers: a single-process model (a DDP or
    DeepSpeed wrapper must see its own forward), no gradient checkpointing (it drops the cache), a plain LM head
    (no soft-capping or logit scale), no WPO weights or MoE router loss, no prompt-learning adapter. Else `model`."""
    import torch
    if not getattr(trainer, "share_prompt", False) or not isinstance(model, torch.nn.Module):
        return model
    if trainer.accelerator.unwrap_model(model) is not model or trainer.args.gradient_checkpointing:
        return model
    if trainer.use_weighting or trainer.aux_loss_enabled:
        return model
    peft_cfg = getattr(model, "peft_config", None)
    if peft_cfg and any(c.is_prompt_learning for c in peft_cfg.values()):
        return model
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = lm.config.get_text_config()
    if any(getattr(text, a, None) not in (None, 1, 1.0) for a in ("final_logit_softcapping", "logit_scale",
                                                                   "output_multiplier", "lm_head_multiplier",
                                                                   "logits_scaling")):
        return model
    return SharedPromptForward(model, lm)


def _masked_trainer_cls():
    from trl import DPOTrainer

    class MaskedDPOTrainer(DPOTrainer):
        """DPOTrainer that accepts rows pre-tokenised by `tokenize_pairs` and keeps their per-token masks; with
        `share_prompt` its forwards encode each pair's prompt once (SharedPromptForward)."""

        share_prompt = False

        def _compute_loss(self, model, inputs, return_outputs):
            return super()._compute_loss(share_prompt_forward(self, model), inputs, return_outputs)

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(share_prompt_forward(self, model), inputs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda r: len(r["prompt_ids"]) < args.max_length,
                                         desc=f"dropping {dataset_name} rows whose prompt fills max_length")
            return dataset

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(self._signature_columns) + ["chosen_mask", "rejected_mask"]

    return MaskedDPOTrainer


def dpo_config(cfg: DPOSettings, out_dir: Path):
    from trl import DPOConfig
    loss_type = list(cfg.loss_type)
    weights = list(cfg.loss_weights) if cfg.loss_weights else [1.0] * len(loss_type)
    if len(weights) != len(loss_type):
        raise InputError("needs one weight per loss_type", field="trainer.loss_weights")
    if cfg.nll_weight > 0:
        loss_type.append("sft")
        weights.append(cfg.nll_weight)
    return hf_args(cfg, out_dir, DPOConfig, beta=cfg.beta, loss_type=loss_type, loss_weights=weights,
                   max_length=cfg.max_length, precompute_ref_log_probs=cfg.precompute_ref_log_probs,
                   remove_unused_columns=True)


def build_dpo_trainer(cfg: DPOSettings, dataset, out_dir: Path, model: str = "smollm2"):
    """(trainer, tokenizer) ready to train; exposed for the benchmark and tests. `trainer.pair_stats` holds
    `pair_stats` of the pairs as given and after `max_pair_similarity`."""
    if isinstance(dataset, (str, Path)):
        dataset = load_dataset_dir(dataset)
    check_columns(dataset, ("prompt", "chosen", "rejected"), "pairs dataset")
    stats = {"given": pair_stats(dataset)}
    dataset = drop_similar(dataset, cfg.max_pair_similarity)
    if cfg.max_pair_similarity < 1.0:
        stats["kept"] = pair_stats(dataset)
        if len(dataset) == 0:
            raise InputError(f"every pair is at least {cfg.max_pair_similarity} similar; raise it",
                             field="trainer.max_pair_similarity")
    args = dpo_config(cfg, out_dir / "checkpoints")   # before the model: ZeRO-3's zero.Init (see train_sft)
    policy, tok, peft_cfg = load_trainable(model, cfg)
    train = tokenize_pairs(dataset, tok)
    if cfg.self_eval:
        from rag_dpo.train.self_eval import self_eval_dpo_trainer
        trainer = self_eval_dpo_trainer(cfg, policy, tok, peft_cfg, dataset, train, args, [divergence_guard()])
    else:
        collator = _masked_collator_cls()(pad_token_id=tok.pad_token_id, max_length=args.max_length,
                                          truncation_mode=args.truncation_mode)
        cls = _masked_trainer_cls()
        cls.share_prompt = cfg.share_prompt                # before __init__: TRL precomputes the reference there
        trainer = cls(model=policy, args=args, train_dataset=train, processing_class=tok, peft_config=peft_cfg,
                      data_collator=collator, callbacks=[divergence_guard()])
    trainer.pair_stats = stats
    return trainer, tok


def train_dpo(cfg: DPOSettings, dataset, out_dir: str | Path, model: str = "smollm2") -> Path:
    """DPO-train `model` (policy spec; an adapter folder is continued and its copy is the reference) on `dataset`
    (datasets.Dataset or save_to_disk folder of {prompt, chosen, rejected}); saves to out_dir, resumable."""
    out_dir = Path(out_dir)
    if is_done(out_dir):
        return out_dir
    if cfg.self_eval and cfg.self_eval_pool_rows > 0:     # DPO into out_dir/dpo, then the score stage into out_dir
        if not isinstance(dataset, (str, Path)):
            raise InputError("trainer.self_eval_pool_rows needs the pairs as a folder (its config.json names the "
                             "labelled pool)", field="trainer.self_eval_pool_rows")
        from rag_dpo.train.self_eval import train_score_stage
        first = train_dpo(dataclasses.replace(cfg, self_eval_pool_rows=0), dataset, out_dir / "dpo", model)
        return train_score_stage(cfg, dataset, first, out_dir)
    trainer, tok = build_dpo_trainer(cfg, dataset, out_dir, model)
    trainer.train(resume_from_checkpoint=last_checkpoint(out_dir / "checkpoints"))
    return finish_training(trainer, tok, out_dir, model,
                           ["loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                            "rewards/chosen", "rewards/rejected", "self_eval_loss"], "DPO",
                           extra={"pairs": trainer.pair_stats, **self_eval_extra(cfg)})
