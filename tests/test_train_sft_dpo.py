"""SFT and DPO trainers on the tiny model: retrieved text is never a target, losses go down on a fixed batch,
resume continues from the saved step, and the saved adapter loads through agent.policy.load_policy."""

from __future__ import annotations

import json

import pytest

from rag_dpo.agent.protocol import format_observation, format_step, render_context, render_prompt, tokenize_path
from rag_dpo.records import ANSWER, SEARCH, Passage, Step


def _steps(tok):
    obs = format_observation([Passage("p1", "Paris", "Paris is the capital and largest city of France.")], tok, 48)
    s0 = Step("0", None, format_step("I need the capital.", SEARCH, "capital of France"), SEARCH,
              query="capital of France", observation=obs)
    s1 = Step("1", "0", format_step("Found it.", ANSWER, "Paris"), ANSWER, answer="Paris")
    return s0, s1


def test_chain_tokenizer_matches_tokenize_path_and_masks_retrieved_text(tokenizer):
    from rag_dpo.pairs import chain_text
    from rag_dpo.train.common import ChainTokenizer
    s0, s1 = _steps(tokenizer)
    q = "What is the capital of France?"
    ref = tokenize_path(tokenizer, q, [s0, s1])
    ct = ChainTokenizer(tokenizer)
    text, spans = chain_text([s0, s1])
    for info_spans in (None, spans):   # found from the text, or given by the pairs stage
        p = ct.prompt(render_prompt(tokenizer, q))
        c, m = ct.completion(text, info_spans)
        assert p + c == ref.input_ids
        assert [0] * len(p) + m == ref.policy_mask
    # a step-level prompt (prefix with retrieved text) tokenises like the rollout engine's context
    assert ct.prompt(render_context(tokenizer, q, [s0])) == tokenize_path(tokenizer, q, [s0]).input_ids
    # a search step as a completion gets no EOS (the turn goes on); an answer step does
    assert ct.completion(s0.text)[0][-1] != tokenizer.eos_token_id
    assert ct.completion(s1.text)[0][-1] == tokenizer.eos_token_id


def _sft_rows(tok, n=4):
    s0, s1 = _steps(tok)
    from rag_dpo.pairs import chain_text
    text, spans = chain_text([s0, s1])
    return [{"prompt": render_prompt(tok, "What is the capital of France?"), "completion": text,
             "completion_info_spans": spans}] * n


def test_sft_labels_skip_prompt_and_retrieved_tokens(tokenizer):
    from datasets import Dataset

    from rag_dpo.train.sft import tokenize_sft
    s0, s1 = _steps(tokenizer)
    ref = tokenize_path(tokenizer, "What is the capital of France?", [s0, s1])
    row = tokenize_sft(Dataset.from_list(_sft_rows(tokenizer, 1)), tokenizer)[0]
    assert row["input_ids"] == ref.input_ids
    assert [int(x != -100) for x in row["labels"]] == ref.policy_mask
    a, b = ref.info_spans[0]
    assert all(x == -100 for x in row["labels"][a:b])


def _count_steps(monkeypatch, cls):
    calls = {"n": 0}
    orig = cls.training_step

    def counting(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(cls, "training_step", counting)
    return calls


def test_sft_loss_decreases_resumes_and_loads(tmp_path, tiny_policy_dir, tokenizer, monkeypatch):
    from datasets import Dataset
    from trl import SFTTrainer

    from rag_dpo.agent.policy import load_policy
    from rag_dpo.train.sft import SFTSettings, train_sft
    ds = Dataset.from_list(_sft_rows(tokenizer))
    cfg = SFTSettings(max_steps=2, learning_rate=5e-3, per_device_train_batch_size=4, logging_steps=1,
                      save_steps=2, precision="fp32", wandb=False)
    out = tmp_path / "sft"
    train_sft(cfg, ds, out, model=str(tiny_policy_dir))
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    # "interrupt" after step 2 and ask for 4 steps: the rerun resumes and does only the 2 missing steps
    (out / "train_done.json").unlink()
    calls = _count_steps(monkeypatch, SFTTrainer)
    cfg.max_steps = 4
    train_sft(cfg, ds, out, model=str(tiny_policy_dir))
    assert calls["n"] == 2
    log = json.loads((out / "train_log.json").read_text())
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert losses[-1] < losses[0]
    assert (out / "adapter_config.json").exists() and (out / "train_curves.png").exists()
    model, tok = load_policy(str(out))
    assert type(model).__name__.startswith("PeftModel") and tok.eos_token == tokenizer.eos_token


def _pairs(tok, outcome: bool):
    from rag_dpo.pairs import chain_text
    s0, s1 = _steps(tok)
    q = "What is the capital of France?"
    if outcome:
        bad = Step("1", "0", format_step("Guess.", ANSWER, "Lyon"), ANSWER, answer="Lyon")
        ctext, cspans = chain_text([s0, s1])
        rtext, rspans = chain_text([s0, bad])
        row = {"prompt": render_prompt(tok, q), "chosen": ctext, "rejected": rtext, "chosen_info_spans": cspans,
               "rejected_info_spans": rspans}
    else:
        row = {"prompt": render_context(tok, q, [s0]), "chosen": s1.text,
               "rejected": format_step("Guess.", ANSWER, "Lyon"), "chosen_info_spans": [],
               "rejected_info_spans": []}
    return [row] * 4


def test_dpo_collator_masks_retrieved_tokens(tmp_path, tiny_policy_dir, tokenizer):
    from datasets import Dataset

    from rag_dpo.train.dpo import DPOSettings, build_dpo_trainer
    cfg = DPOSettings(max_steps=1, precision="fp32", wandb=False, precompute_ref_log_probs=False)
    trainer, tok = build_dpo_trainer(cfg, Dataset.from_list(_pairs(tokenizer, outcome=True)), tmp_path / "d",
                                     model=str(tiny_policy_dir))
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    s0, s1 = _steps(tokenizer)
    ref = tokenize_path(tokenizer, "What is the capital of France?", [s0, s1])
    n = len(ref.input_ids)
    assert batch["input_ids"][0, :n].tolist() == ref.input_ids
    assert batch["completion_mask"][0, :n].tolist() == ref.policy_mask   # 0 on prompt and retrieved text
    a, b = ref.info_spans[0]
    assert batch["completion_mask"][1, a:b].sum() == 0                     # the rejected chain too
    assert batch["attention_mask"][0, a:b].all()                           # retrieved text stays context


@pytest.mark.parametrize("outcome", [False, True])
def test_dpo_loss_decreases_and_saves(tmp_path, tiny_policy_dir, tokenizer, outcome):
    from datasets import Dataset

    from rag_dpo.agent.policy import load_policy
    from rag_dpo.train.dpo import DPOSettings, train_dpo
    cfg = DPOSettings(max_steps=4, learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1,
                      save_steps=10, precision="fp32", wandb=False, nll_weight=0.2 if outcome else 0.0,
                      precompute_ref_log_probs=outcome)
    out = train_dpo(cfg, Dataset.from_list(_pairs(tokenizer, outcome)), tmp_path / "dpo", model=str(tiny_policy_dir))
    log = [r for r in json.loads((out / "train_log.json").read_text()) if "loss" in r]
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["rewards/margins"] > 0
    model, _ = load_policy(str(out))
    assert type(model).__name__.startswith("PeftModel")


def test_dpo_collator_batches_rows_of_different_length_with_padding_and_truncation(tokenizer):
    """Two pairs of different lengths in one batch, max_length cutting the longer one inside its completion: each
    of the four rows' completion_mask is its own policy mask (0 on prompt, retrieved text and padding), truncated
    at max_length, and padding is never attended to."""
    from datasets import Dataset

    from rag_dpo.pairs import chain_text
    from rag_dpo.train.dpo import _masked_collator_cls, tokenize_pairs
    s0, s1 = _steps(tokenizer)
    long_obs = format_observation([Passage(f"p{i}", f"T{i}", "A long passage about France and its cities. " * 3)
                                   for i in range(3)], tokenizer, 48)
    l0 = Step("0", None, s0.text, SEARCH, query="capital of France", observation=long_obs)
    bad = Step("1", "0", format_step("Guess.", ANSWER, "Lyon"), ANSWER, answer="Lyon")
    rows = []
    for first in (s0, l0):
        ctext, cspans = chain_text([first, s1])
        rtext, rspans = chain_text([first, bad])
        rows.append({"prompt": render_prompt(tokenizer, "What is the capital of France?"), "chosen": ctext,
                     "rejected": rtext, "chosen_info_spans": cspans, "rejected_info_spans": rspans})
    data = tokenize_pairs(Dataset.from_list(rows), tokenizer)
    full = [len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in data]
    assert full[0] < full[1]
    max_len = full[1] - 4                                   # cuts the long row's answer step, not the short row
    assert max_len > full[0]
    coll = _masked_collator_cls()(pad_token_id=tokenizer.pad_token_id, max_length=max_len,
                                  truncation_mode="keep_start")
    batch = coll([data[0], data[1]])
    width = batch["input_ids"].shape[1]
    assert width == max_len
    expected = []
    for kind in ("chosen", "rejected"):
        for r in data:
            ids = (r["prompt_ids"] + r[f"{kind}_ids"])[:max_len]
            mask = ([0] * len(r["prompt_ids"]) + r[f"{kind}_mask"])[:max_len]
            expected.append((ids, mask))
    for i, (ids, mask) in enumerate(expected):
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["completion_mask"][i].tolist() == mask + [0] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    # the retrieved block of the long row is context (attended), never a target
    info = [j for j, m in enumerate(expected[1][1]) if m == 0 and j >= len(data[1]["prompt_ids"])]
    assert info and all(batch["attention_mask"][1, j] == 1 for j in info)


def _dpo_loss_and_grads(tiny_policy_dir, rows, out, share: bool, gradient_checkpointing: bool = False):
    """Loss, LoRA gradients, precomputed reference log-probs and tokens fed to the model for one batch of `rows`
    (LoRA B perturbed so the policy differs from its reference)."""
    import torch
    from datasets import Dataset

    from rag_dpo.train.dpo import DPOSettings, build_dpo_trainer
    torch.manual_seed(0)
    cfg = DPOSettings(max_steps=1, precision="fp32", wandb=False, precompute_ref_log_probs=True, nll_weight=0.5,
                      per_device_train_batch_size=len(rows), share_prompt=share,
                      gradient_checkpointing=gradient_checkpointing)
    fed = []
    from rag_dpo.train import dpo as dpo_mod
    tr, _ = build_dpo_trainer(cfg, Dataset.from_list(rows), out, model=str(tiny_policy_dir))
    for name, param in tr.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    emb = tr.model.get_input_embeddings()
    hook = emb.register_forward_hook(lambda m, i, o: fed.append(i[0].numel()))
    tr.model.train()
    loss = tr.compute_loss(tr.model, tr.data_collator([tr.train_dataset[i] for i in range(len(rows))]))
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    ref = tr.train_dataset["ref_chosen_logps"][:] + tr.train_dataset["ref_rejected_logps"][:]
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
    return loss.item(), grads, ref, sum(fed), metrics, dpo_mod.share_prompt_forward(tr, tr.model)


@pytest.mark.parametrize("outcome", [False, True])
def test_shared_prompt_forward_gives_trls_loss_and_gradients(tmp_path, tiny_policy_dir, tokenizer, outcome,
                                                              monkeypatch):
    """The pair's prompt encoded once (keys/values repeated to chosen and rejected) gives TRL's loss, gradients,
    reference log-probs and logged metrics, for step pairs and for outcome pairs with retrieved text, in a batch of
    two pairs of different lengths, its LM head in slices of 5 positions -- and feeds the model fewer tokens.
    Gradient checkpointing turns it off."""
    import torch

    from rag_dpo.train.dpo import SharedPromptForward
    monkeypatch.setattr(SharedPromptForward, "CHUNK", 5)
    rows = _pairs(tokenizer, outcome)[:2]
    rows[1] = {**rows[1], "chosen": rows[1]["chosen"] + " and a few more words"}
    base = _dpo_loss_and_grads(tiny_policy_dir, rows, tmp_path / "a", share=False)
    shared = _dpo_loss_and_grads(tiny_policy_dir, rows, tmp_path / "b", share=True)
    assert type(base[5]).__name__ != "SharedPromptForward" and type(shared[5]).__name__ == "SharedPromptForward"
    assert shared[0] == pytest.approx(base[0], rel=1e-5)
    assert set(shared[1]) == set(base[1]) and len(base[1]) > 0
    for name, g in base[1].items():
        assert torch.allclose(shared[1][name], g, rtol=1e-4, atol=2e-5 * g.abs().max().item()), name
    assert shared[2] == pytest.approx(base[2], rel=1e-5)
    # rewards are beta x differences of ~400-nat log-prob sums, which float32 resolves to a few 1e-5 nat: allow
    # that rounding (seen on an AVX-512/AMX CPU: margins 0.0253250 vs 0.0253281, log-probs equal to 7 digits)
    rounding = 4 * 0.1 * torch.finfo(torch.float32).eps * max(abs(base[4]["logps/chosen"]),
                                                               abs(base[4]["logps/rejected"]))
    for key in ("rewards/margins", "logps/chosen", "entropy", "logits/chosen", "mean_token_accuracy"):
        tol = rounding if key.startswith("rewards/") else 1e-6
        assert shared[4][key] == pytest.approx(base[4][key], rel=1e-4, abs=max(tol, 1e-6)), key
    assert shared[3] < base[3]                   # the prompts went through the model once, not twice
    checkpointed = _dpo_loss_and_grads(tiny_policy_dir, rows, tmp_path / "c", share=True,
                                       gradient_checkpointing=True)
    assert type(checkpointed[5]).__name__ != "SharedPromptForward"


def test_shared_prompt_forward_handles_pairs_without_a_shared_prefix(tiny_model_and_tokenizer):
    """A pair whose rows differ from the first token, and one whose rows are identical, give the log-probs of a
    plain forward of each row."""
    import torch

    from rag_dpo.train.dpo import SharedPromptForward
    model, tok = tiny_model_and_tokenizer
    a = tok("The capital of France is Paris.", add_special_tokens=False).input_ids
    b = tok("Lyon is a city in France, not the capital.", add_special_tokens=False).input_ids
    width = max(len(a), len(b))
    ids = torch.tensor([a + [tok.pad_token_id] * (width - len(a)), a + [tok.pad_token_id] * (width - len(a)),
                        b + [tok.pad_token_id] * (width - len(b)), a + [tok.pad_token_id] * (width - len(a))])
    att = (torch.arange(width)[None] < torch.tensor([len(a), len(a), len(b), len(a)])[:, None]).long()
    labels = ids.masked_fill(att == 0, -100)
    labels[:, :2] = -100
    with torch.no_grad():
        out = SharedPromptForward(model, model)(input_ids=ids, attention_mask=att, labels=labels, fused_lm_head=True)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    want = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    want = want * (labels[:, 1:] != -100)
    assert torch.allclose(out.log_probs, want, atol=1e-5)


def test_pair_stats_counts_actions_and_near_identical_pairs():
    from datasets import Dataset

    from rag_dpo.train.dpo import drop_similar, pair_stats
    search = format_step("I need more.", SEARCH, "capital of France")
    rows = [{"prompt": "p", "chosen": format_step("Sure.", ANSWER, "Paris"), "rejected": search},
            {"prompt": "p", "chosen": format_step("Sure.", ANSWER, "Paris"), "rejected": search},
            {"prompt": "p", "chosen": search, "rejected": format_step("Hm.", ANSWER, "Lyon")},
            {"prompt": "p", "chosen": search, "rejected": search.replace("France", "Frence")}]
    st = pair_stats(Dataset.from_list(rows))
    assert st["rows"] == 4 and st["actions"] == {"answer>search": 2, "search>answer": 1, "search>search": 1}
    assert st["answer_over_search"] == 2 and st["near_identical"] == 1
    kept = drop_similar(Dataset.from_list(rows), 0.9)
    assert len(kept) == 3 and search.replace("France", "Frence") not in kept["rejected"]
    outcome = pair_stats(Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_steps": 2,
                                             "rejected_steps": 3}]))
    assert outcome["actions"] == {"fewer steps": 1} and outcome["answer_over_search"] == 1


def test_health_flags_displacement_kl_spikes_and_entropy_collapse():
    from rag_dpo.train.common import health
    displaced = [{"rewards/chosen": -0.01 * i, "rewards/rejected": -0.03 * i, "logps/chosen": -10 - i,
                  "logps/rejected": -12 - 2 * i, "entropy": 2.0 - 0.1 * i} for i in range(1, 9)]
    h = health(displaced)
    assert any(f.startswith("likelihood displacement") for f in h["flags"]) and len(h["flags"]) == 1
    assert h["logps_chosen"] == [-11, -18]
    healthy = [{"rewards/chosen": 0.01 * i, "rewards/rejected": -0.03 * i, "entropy": 2.0} for i in range(8)]
    assert health(healthy)["flags"] == []
    ppo = [{"kl": 0.01}, {"kl": 0.012}, {"kl": 0.011}, {"kl": 0.4}, {"kl": 0.02}]
    flags = health(ppo)["flags"]
    assert len(flags) == 1 and flags[0].startswith("KL spike: 0.400 at log 4")
    collapsed = [{"entropy_proxy": 1.5}, {"entropy_proxy": 0.9}, {"entropy_proxy": 0.2}]
    assert health(collapsed)["flags"] == ["entropy collapse: entropy_proxy 1.500 -> 0.200"]


def test_divergence_guard_stops_sft_and_keeps_the_last_good_checkpoint(tmp_path, tiny_policy_dir, tokenizer):
    """A NaN appears in the weights before step 3: the run stops with one TrainingDiverged naming step 3, the
    NaN never reaches a checkpoint (checkpoint-2 is the newest, and finite), and the run is not marked done."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from rag_dpo.train import sft
    from rag_dpo.train.common import TrainingDiverged

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

    ds = Dataset.from_list(_sft_rows(tokenizer))
    cfg = sft.SFTSettings(max_steps=5, learning_rate=1e-3, per_device_train_batch_size=2, logging_steps=1,
                          save_steps=1, save_total_limit=5, precision="fp32", wandb=False)
    out = tmp_path / "sft"
    import unittest.mock as mock
    with mock.patch("trl.SFTTrainer.__init__", _with_callback(Poison())):
        with pytest.raises(TrainingDiverged, match="step 3: non-finite grad_norm"):
            sft.train_sft(cfg, ds, out, model=str(tiny_policy_dir))
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1", "checkpoint-2"] and not (out / "train_done.json").exists()
    from safetensors.torch import load_file
    weights = load_file(str(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def _with_callback(cb):
    from trl import SFTTrainer
    real_init = SFTTrainer.__init__

    def init(self, *a, callbacks=None, **k):
        real_init(self, *a, callbacks=list(callbacks or []) + [cb], **k)
    return init


def test_divergence_guard_reads_logged_losses():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from rag_dpo.train.common import TrainingDiverged, divergence_guard
    g = divergence_guard()
    state = TrainerState()
    state.global_step = 7
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    g.on_log(args, state, TrainerControl(), logs={"loss": 0.5, "grad_norm": 1.0, "learning_rate": 1e-4})
    with pytest.raises(TrainingDiverged, match="step 7: non-finite loss"):
        g.on_log(args, state, TrainerControl(), logs={"loss": float("nan")})


def test_eos_follows_the_data_ends_turn_flag_not_the_text(tokenizer):
    """A rejected invalid `<answer></answer>` step ends with the answer tag but the policy never ended its turn
    there: with the pair builders' `rejected_ends_turn` False it gets no EOS; a chosen answer (True) gets one."""
    from datasets import Dataset

    from rag_dpo.train.dpo import tokenize_pairs
    from rag_dpo.train.sft import tokenize_sft
    eos = tokenizer.eos_token_id
    invalid = "<think>hm</think>\n<answer></answer>"
    row = {"prompt": render_prompt(tokenizer, "Q?"), "chosen": format_step("ok", ANSWER, "Paris"),
           "rejected": invalid, "chosen_info_spans": [], "rejected_info_spans": [], "chosen_ends_turn": True,
           "rejected_ends_turn": False}
    out = tokenize_pairs(Dataset.from_list([row]), tokenizer)[0]
    assert out["chosen_ids"][-1] == eos and out["rejected_ids"][-1] != eos
    legacy = {k: v for k, v in row.items() if not k.endswith("ends_turn")}
    assert tokenize_pairs(Dataset.from_list([legacy]), tokenizer)[0]["rejected_ids"][-1] == eos   # text rule
    sft_row = {"prompt": row["prompt"], "completion": invalid, "completion_info_spans": [],
               "completion_ends_turn": False}
    assert eos not in tokenize_sft(Dataset.from_list([sft_row]), tokenizer)[0]["input_ids"][-1:]
