"""Multi-turn PPO/GRPO: rewards land on the right tokens, GAE skips retrieved tokens, retrieved tokens get zero
gradient, and a few updates on a fixed batch move the policy towards the rewarded chain."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyRetriever

from rag_dpo.agent.protocol import format_observation, format_step, tokenize_path
from rag_dpo.records import ANSWER, SEARCH, Chain, Label, Passage, Step
from rag_dpo.train.ppo import (PPOSettings, chains_to_rollouts, gae, group_advantages, kl_k3, policy_loss,
                               token_rewards, value_loss)


def _chain(tok, answer: str, qid: str = "q1") -> Chain:
    obs = format_observation([Passage("p1", "Paris", "Paris is the capital of France.")], tok, 48)
    s0 = Step("0", None, format_step("Search first.", SEARCH, "capital of France"), SEARCH, query="capital of France",
              observation=obs, retrieved_ids=["p1"])
    s1 = Step("1", "0", format_step("Done.", ANSWER, answer), ANSWER, answer=answer)
    s0.labels["evidence"] = Label(1.0, True, "evidence")
    s1.labels["evidence"] = Label(1.0 if answer == "Paris" else 0.0, answer == "Paris", "evidence")
    return Chain(qid, "What is the capital of France?", ["Paris"], ["p1"], [s0, s1], selected="1")


def test_token_rewards_placement():
    spans = [(10, 20), (30, 35)]
    r = token_rewards(40, spans, [0.5, 0.2], outcome=1.0, mode="process", process_weight=2.0)
    assert r[19] == pytest.approx(1.0) and r[34] == pytest.approx(0.4 + 1.0)
    assert sum(1 for x in r if x) == 2
    r = token_rewards(40, spans, [0.5, 0.2], outcome=1.0, mode="outcome")
    assert r[34] == 1.0 and sum(r) == 1.0


def test_process_rewards_land_on_last_token_of_each_step(tokenizer):
    c = _chain(tokenizer, "Paris")
    tp = tokenize_path(tokenizer, c.question, c.path())
    cfg = PPOSettings(reward="process", process_weight=0.5)
    ro = chains_to_rollouts(tokenizer, [c], None, cfg)
    placed = (ro.rewards[0] != 0).nonzero().flatten().tolist()
    # shifted tensors: index j is token j+1, so the last token of a step span (a, b) sits at b - 2
    assert placed == [b - 2 for _, b in tp.step_spans]
    assert ro.rewards[0, tp.step_spans[0][1] - 2] == pytest.approx(0.5)           # search step: 0.5 * 1.0
    assert ro.rewards[0, tp.step_spans[1][1] - 2] == pytest.approx(0.5 + 1.0)     # answer: 0.5 * 1.0 + F1
    a, b = tp.info_spans[0]
    assert ro.mask[0, a - 1:b - 1].sum() == 0 and ro.mask[0].sum() == sum(tp.policy_mask)


def test_gae_skips_retrieved_tokens():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    adv, ret = gae(rewards, values * mask, mask, gamma=1.0, lam=1.0)
    assert adv[0, 2] == 0 and adv[0, 3] == 0 and ret[0, 2] == 0
    # with lam = gamma = 1 the advantage is return-to-go minus value, across the retrieved gap
    assert adv[0].tolist() == pytest.approx([1.0 - 0.1, 1.0 - 0.2, 0.0, 0.0, 1.0 - 0.3])


def test_group_advantages_normalise_within_question():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    mask = torch.ones_like(rewards)
    adv = group_advantages(rewards, mask, ["a", "a", "b", "b"])
    assert adv[0, 1] > 0 > adv[1, 1]
    assert adv[2].abs().sum() == 0 and adv[3].abs().sum() == 0     # identical rewards: no signal
    assert adv[0, 0] == adv[0, 1]                                  # reward-to-go reaches earlier tokens


def test_retrieved_tokens_get_zero_gradient():
    torch.manual_seed(0)
    logp = torch.randn(2, 6, requires_grad=True)
    values = torch.randn(2, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 0]], dtype=torch.float)
    old, adv, ret = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 6)
    pg, _ = policy_loss(logp, old, adv, mask, 0.2)
    loss = pg + value_loss(values, values.detach() + 0.1, ret, mask, 0.2) + kl_k3(logp, old).mul(mask).mean()
    loss.backward()
    assert (logp.grad[mask == 0] == 0).all() and (values.grad[mask == 0] == 0).all()
    assert (logp.grad[mask == 1] != 0).any()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_updates_move_policy_towards_rewarded_chain(tiny_model_and_tokenizer, algorithm):
    import copy

    from peft import get_peft_model

    from rag_dpo.train.common import TrainerSettings, lora_config
    from rag_dpo.train.ppo import PPOTrainer, forward_logps
    base, tok = tiny_model_and_tokenizer
    model = get_peft_model(copy.deepcopy(base), lora_config(TrainerSettings()))
    cfg = PPOSettings(algorithm=algorithm, reward="outcome", learning_rate=1e-2, ppo_epochs=2, minibatch_size=2,
                      precision="fp32", wandb=False, kl_coef=0.01)
    tr = PPOTrainer(cfg, policy=model, tokenizer=tok)
    ro = chains_to_rollouts(tok, [_chain(tok, "Paris"), _chain(tok, "Lyon")], None, cfg)

    def margin():
        with torch.no_grad():
            logp, _ = forward_logps(tr.policy, None, ro.input_ids, ro.attention_mask, with_values=False)
        s = (logp * ro.mask).sum(-1)
        return float(s[0] - s[1])

    before = margin()
    stats = [tr.update(ro) for _ in range(3)]
    assert margin() > before + 0.1
    assert stats[0]["outcome"] == pytest.approx(0.5)
    if algorithm == "ppo":
        assert stats[0]["vf_loss"] > 0 and stats[0]["pg_loss"] != 0
    # a fresh adapter's reference is the base model: what ref_logps returns (not the moved policy)
    assert tr.ref_adapter is None
    with torch.no_grad():
        base_logp, _ = forward_logps(base, None, ro.input_ids, ro.attention_mask, with_values=False)
        now, _ = forward_logps(tr.policy, None, ro.input_ids, ro.attention_mask, with_values=False)
    ref = tr.ref_logps(ro.input_ids, ro.attention_mask)
    assert torch.allclose(ref, base_logp, atol=1e-5) and not torch.allclose(now, base_logp, atol=1e-3)


def test_update_cuts_each_minibatch_to_its_longest_row(tiny_model_and_tokenizer, monkeypatch):
    """Rows are right-padded to the round's longest chain; every forward sees only its own rows' columns, and a
    short row's log-probs are the same with or without the trailing padding (causal attention)."""
    import copy

    from peft import get_peft_model

    from rag_dpo.train import ppo
    from rag_dpo.train.common import TrainerSettings, lora_config
    base, tok = tiny_model_and_tokenizer
    model = get_peft_model(copy.deepcopy(base), lora_config(TrainerSettings()))
    cfg = PPOSettings(reward="outcome", ppo_epochs=1, minibatch_size=1, precision="fp32", wandb=False)
    tr = ppo.PPOTrainer(cfg, policy=model, tokenizer=tok)
    ro = chains_to_rollouts(tok, [_chain(tok, "Paris"), _chain(tok, "Lyon " * 30, "q2")], None, cfg)
    lengths = ro.attention_mask.sum(-1).tolist()
    assert lengths[0] < lengths[1] == ro.input_ids.shape[1]
    seen = []
    real = ppo.forward_logps

    def spy(model, head, ids, att, **kw):
        seen.append((ids.shape[1], int(att.sum(-1).max())))
        return real(model, head, ids, att, **kw)

    monkeypatch.setattr(ppo, "forward_logps", spy)
    stats = tr.update(ro)
    assert len(seen) == 2 * 2 + 2        # old + ref (adapter disabled) per row, then one update per row
    assert all(width == longest for width, longest in seen) and {w for w, _ in seen} == set(lengths)
    assert stats["pg_loss"] == stats["pg_loss"] and stats["vf_loss"] > 0
    short = lengths[0]
    with torch.no_grad():
        full, _ = real(model, None, ro.input_ids[:1], ro.attention_mask[:1], with_values=False)
        cut, _ = real(model, None, ro.input_ids[:1, :short], ro.attention_mask[:1, :short], with_values=False)
    assert torch.allclose(full[:, : short - 1], cut, atol=1e-5)


def test_policy_token_only_head_matches_the_full_forward(tiny_model_and_tokenizer):
    """`only=` (LM head on policy tokens alone) gives the same log-probs, values and LoRA gradients there."""
    import copy

    from peft import get_peft_model

    from rag_dpo.train.common import TrainerSettings, lora_config
    from rag_dpo.train.ppo import forward_logps
    base, tok = tiny_model_and_tokenizer
    model = get_peft_model(copy.deepcopy(base), lora_config(TrainerSettings()))
    for n, p in model.named_parameters():      # non-zero LoRA B so the adapter changes the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    head = torch.nn.Linear(base.config.hidden_size, 1)
    ro = chains_to_rollouts(tok, [_chain(tok, "Paris"), _chain(tok, "Lyon")], None, PPOSettings())
    grads = []
    outs = []
    for only in (None, ro.mask):
        model.zero_grad()
        logp, v = forward_logps(model, head, ro.input_ids, ro.attention_mask, only=only)
        (logp * ro.mask).sum().backward()
        outs.append((logp * ro.mask, v * ro.mask))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5) and torch.allclose(outs[0][1], outs[1][1], atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-5) for n in grads[0])
    lp, v = forward_logps(model, None, ro.input_ids, ro.attention_mask, with_values=False, only=ro.mask)
    assert v is None and torch.allclose(lp, outs[1][0], atol=1e-5)


def test_rollouts_with_merged_lora_match_and_leave_the_adapter_intact(tiny_model_and_tokenizer):
    """`merged_lora` (PPO's rollouts): the merged model gives the adapter's outputs, and afterwards the base
    weights are restored and the LoRA parameters are still the trainable ones."""
    import copy

    from peft import get_peft_model

    from rag_dpo.train.common import TrainerSettings, lora_config
    from rag_dpo.train.ppo import forward_logps, merged_lora
    base, tok = tiny_model_and_tokenizer
    model = get_peft_model(copy.deepcopy(base), lora_config(TrainerSettings()))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ro = chains_to_rollouts(tok, [_chain(tok, "Paris")], None, PPOSettings())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want, _ = forward_logps(model, None, ro.input_ids, ro.attention_mask, with_values=False)
        with merged_lora(model):
            assert any(getattr(m, "merged", False) for m in model.modules())
            got, _ = forward_logps(model, None, ro.input_ids, ro.attention_mask, with_values=False)
        plain, _ = forward_logps(base, None, ro.input_ids, ro.attention_mask, with_values=False)
    assert torch.allclose(want, got, atol=1e-4) and not torch.allclose(want, plain, atol=1e-4)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    after = dict(model.named_parameters())
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)
    assert all(after[n].requires_grad for n in before if "lora_" in n)


def test_train_ppo_spends_its_token_budget_and_resumes_after_a_kill(tmp_path, tiny_policy_dir):
    """The loop: rounds stop near `max_generated_tokens` (the last one shrinks), an interrupted run continues
    from its last finished round without repeating or losing log rows, and the policy is saved at the end."""
    import json

    from rag_dpo.records import Corpus, Passage, Question
    from rag_dpo.train.ppo import PPOInputs, PPOTrainer, train_ppo
    corpus = Corpus([Passage(f"p{i}", f"Title {i}", f"Passage number {i} says something.") for i in range(6)])
    qs = [Question(f"q{i}", f"What is thing {i}?", [f"thing {i}"], [f"p{i}"]) for i in range(6)]
    inputs = PPOInputs(qs, corpus, ToyRetriever(corpus), {"max_new_tokens": 8, "max_steps": 2, "batch_size": 4})
    cfg = PPOSettings(reward="outcome", iterations=50, questions_per_iteration=3, group_size=2, ppo_epochs=1,
                      minibatch_size=4, precision="fp32", wandb=False, max_generated_tokens=120)
    out = tmp_path / "ppo"

    class Killed(Exception):
        pass

    tr = PPOTrainer(cfg, str(tiny_policy_dir))
    real_update, calls = tr.update, []

    def update_then_die(ro):
        if len(calls) == 1:
            raise Killed
        calls.append(1)
        return real_update(ro)

    tr.update = update_then_die
    with pytest.raises(Killed):
        train_ppo(cfg, inputs, out, str(tiny_policy_dir), trainer=tr)
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1]
    first = json.loads((out / "budget.json").read_text())

    train_ppo(cfg, inputs, out, str(tiny_policy_dir))          # rerun: resumes at round 2
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2
    spent = json.loads((out / "budget.json").read_text())
    assert spent["generated_tokens"] == sum(r["generated_tokens"] for r in rows) > first["generated_tokens"]
    per_chain = spent["generated_tokens"] / spent["rollouts"]
    assert 120 <= spent["generated_tokens"] < 120 + 2 * per_chain * cfg.group_size   # near the cap, not a round past
    assert (out / "adapter_config.json").exists() and (out / "train_done.json").exists()


# ---- credit assignment, GRPO over step positions, separate clipping, continued-adapter reference, guard --------

def test_lambda_one_carries_the_outcome_to_a_first_step_60_tokens_back():
    """Hand-built chain: a 60-token search step, 10 retrieved tokens, a 20-token answer with outcome 1, values 0.
    The default lambda (1, Search-R1's) gives the first search token the whole outcome; the old 0.95 gave ~2 %."""
    n_search, n_info, n_answer = 60, 10, 20
    mask = torch.tensor([[1.0] * n_search + [0.0] * n_info + [1.0] * n_answer])
    rewards = torch.zeros_like(mask)
    rewards[0, -1] = 1.0
    values = torch.zeros_like(mask)
    cfg = PPOSettings()
    assert cfg.gamma == 1.0 and cfg.lam == 1.0
    adv, ret = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    assert adv[0, 0] == pytest.approx(1.0) and adv[0, n_search - 1] == pytest.approx(1.0)
    assert ret[0, 0] == pytest.approx(1.0)
    old, _ = gae(rewards, values, mask, 1.0, 0.95)
    assert old[0, 0] == pytest.approx(0.95 ** (n_search + n_answer - 1), rel=1e-5) and old[0, 0] < 0.05


def test_grpo_process_mode_penalises_a_zero_valued_step(tokenizer):
    """Two chains of one question, both right in the end; the first one's search step is valued 0 by the
    annotator, the second one's 1. Step values normalised over every step position of the group: the 0-valued step
    comes out negative and its sibling positive (the equal outcomes add nothing); before, a 0 reward stayed 0."""
    good, bad = _chain(tokenizer, "Paris"), _chain(tokenizer, "Paris")
    bad.steps[0].labels["evidence"] = Label(0.0, False, "evidence")
    cfg = PPOSettings(algorithm="grpo", reward="process", process_weight=1.0)
    ro = chains_to_rollouts(tokenizer, [bad, good], None, cfg)
    tp = tokenize_path(tokenizer, bad.question, bad.path())
    ends = [b - 2 for _, b in tp.step_spans]                       # shifted index of each step's last token
    assert (ro.positions[0].nonzero().flatten().tolist() == ends == ro.positions[1].nonzero().flatten().tolist())
    assert ro.rewards[0, ends[0]] == 0                              # a zero reward, but a reward position
    assert ro.step_values[0, ends[0]] == 0 and ro.step_values[1, ends[0]] == 1
    adv = group_advantages(ro.rewards, ro.mask, ro.groups, ro.positions, ro.step_values, cfg.process_weight)
    first = int(ro.mask[0].nonzero()[0])
    # the search step's own normalised reward: advantage at its last token minus that of the next policy token
    after = int(ro.mask[0, ends[0] + 1:].nonzero()[0]) + ends[0] + 1
    own_bad = adv[0, ends[0]] - adv[0, after]
    own_good = adv[1, ends[0]] - adv[1, after]
    assert own_bad < 0 < own_good
    assert adv[0, first] < adv[1, first]
    legacy = group_advantages(ro.rewards, ro.mask, ro.groups)     # old rule: nonzero rewards only
    assert legacy[0, ends[0]] - legacy[0, after] == 0
    # a wrong final answer on the first chain: its outcome is normalised against the sibling's, apart from steps
    wrong = _chain(tokenizer, "Lyon")
    ro2 = chains_to_rollouts(tokenizer, [wrong, good], None, cfg)
    adv2 = group_advantages(ro2.rewards, ro2.mask, ro2.groups, ro2.positions, ro2.step_values, 1.0)
    last = [int(ro2.mask[i].nonzero()[-1]) for i in range(2)]
    assert adv2[0, last[0]] < 0 < adv2[1, last[1]]


def test_policy_and_value_gradients_are_clipped_separately(tiny_model_and_tokenizer, monkeypatch):
    """The value head sits on detached features and each gradient is clipped to its own norm: scaling every
    reward by 100 (whitened advantages unchanged, value loss 10^4 x larger) leaves the policy's clipped gradient
    exactly the same. Under one joint clip the huge value gradient shrank the policy step."""
    import copy

    from peft import get_peft_model

    from rag_dpo.train.common import TrainerSettings, lora_config
    from rag_dpo.train.ppo import PPOTrainer
    base, tok = tiny_model_and_tokenizer
    grads = []
    for scale in (1.0, 100.0):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), lora_config(TrainerSettings()))
        cfg = PPOSettings(reward="outcome", ppo_epochs=1, minibatch_size=2, precision="fp32", wandb=False,
                          max_grad_norm=0.5, value_max_grad_norm=0.5, kl_coef=0.0)
        tr = PPOTrainer(cfg, policy=model, tokenizer=tok)
        ro = chains_to_rollouts(tok, [_chain(tok, "Paris"), _chain(tok, "Lyon")], None, cfg)
        ro.rewards = ro.rewards * scale
        seen = {}

        def spy(*a, _tr=tr, _seen=seen, **k):
            _seen["policy"] = [p.grad.clone() for p in _tr.optimizer.param_groups[0]["params"] if p.grad is not None]
            _seen["value"] = [p.grad.clone() for p in _tr.optimizer.param_groups[1]["params"]]

        monkeypatch.setattr(tr.optimizer, "step", spy)
        stats = tr.update(ro)
        grads.append((seen, stats))
    (a, sa), (b, sb) = grads
    assert sb["vf_loss"] > 1000 * sa["vf_loss"] and sb["value_grad_norm"] > 10 * sa["value_grad_norm"]
    assert len(a["policy"]) > 0 and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a["policy"], b["policy"]))
    vnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in b["value"]]))
    assert vnorm <= 0.5 + 1e-4                                     # the value head's own clip


def test_continued_adapter_reference_stays_at_the_starting_adapter(tmp_path, tiny_policy_dir):
    """compare's PPO arms continue the warm-start adapter: the reference must be that adapter (not the base
    model), frozen while the policy moves, and left out of the saved policy."""
    from peft import get_peft_model

    from rag_dpo.train.common import TrainerSettings, load_trainable, lora_config, save_policy
    from rag_dpo.train.ppo import PPOTrainer, forward_logps
    cfg0 = TrainerSettings(precision="fp32")
    base, tok, _ = load_trainable(str(tiny_policy_dir), cfg0)
    warm = get_peft_model(base, lora_config(cfg0))
    torch.manual_seed(1)
    for n, p in warm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    save_policy(warm, tok, tmp_path / "warm", str(tiny_policy_dir))
    cfg = PPOSettings(reward="outcome", learning_rate=1e-2, ppo_epochs=2, minibatch_size=2, precision="fp32",
                      wandb=False)
    tr = PPOTrainer(cfg, str(tmp_path / "warm"))
    assert tr.ref_adapter == "ref"
    ro = chains_to_rollouts(tr.tok, [_chain(tr.tok, "Paris"), _chain(tr.tok, "Lyon")], None, cfg)

    def logps(adapter=None):
        m = tr.unwrapped()
        with torch.no_grad():
            if adapter == "base":
                with m.disable_adapter():
                    return forward_logps(m, None, ro.input_ids, ro.attention_mask, with_values=False)[0]
            return forward_logps(m, None, ro.input_ids, ro.attention_mask, with_values=False)[0]

    start, base_lp = logps(), logps("base")
    assert not torch.allclose(start, base_lp, atol=1e-4)           # the warm start is not the base model
    assert torch.allclose(tr.ref_logps(ro.input_ids, ro.attention_mask), start, atol=1e-5)
    for _ in range(2):
        stats = tr.update(ro)
    now = logps()
    assert not torch.allclose(now, start, atol=1e-3)               # the policy moved ...
    assert torch.allclose(tr.ref_logps(ro.input_ids, ro.attention_mask), start, atol=1e-5)   # ... its reference not
    assert tr.unwrapped().active_adapter == "default" and abs(stats["kl"]) > 0   # round 2 is measured against it
    save_policy(tr.unwrapped(), tr.tok, tmp_path / "out", str(tmp_path / "warm"))
    assert not (tmp_path / "out" / "ref").exists()


def test_non_finite_loss_stops_ppo_and_keeps_the_last_good_round(tmp_path, tiny_policy_dir):
    """Round 2's rewards are NaN: the run stops with one TrainingDiverged naming round 2, round 1's checkpoint is
    still the newest, and nothing is marked done."""
    from rag_dpo.records import Corpus, Passage, Question
    from rag_dpo.train.common import TrainingDiverged
    from rag_dpo.train.ppo import PPOInputs, PPOTrainer, train_ppo
    corpus = Corpus([Passage(f"p{i}", f"Title {i}", f"Passage number {i} says something.") for i in range(4)])
    qs = [Question(f"q{i}", f"What is thing {i}?", [f"thing {i}"], [f"p{i}"]) for i in range(4)]
    inputs = PPOInputs(qs, corpus, ToyRetriever(corpus), {"max_new_tokens": 6, "max_steps": 2, "batch_size": 4})
    cfg = PPOSettings(reward="outcome", iterations=3, questions_per_iteration=2, group_size=2, ppo_epochs=1,
                      minibatch_size=4, precision="fp32", wandb=False)
    tr = PPOTrainer(cfg, str(tiny_policy_dir))
    real = tr.update

    def poisoned(ro):
        if tr.iteration == 1:
            ro.rewards[:] = float("nan")
        return real(ro)

    tr.update = poisoned
    out = tmp_path / "ppo"
    with pytest.raises(TrainingDiverged, match=r"PPO round 2: non-finite"):
        train_ppo(cfg, inputs, out, str(tiny_policy_dir), trainer=tr)
    assert [p.name for p in (out / "checkpoints").glob("iter-*")] == ["iter-1"]
    assert not (out / "train_done.json").exists()
