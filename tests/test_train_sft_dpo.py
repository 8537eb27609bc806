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
