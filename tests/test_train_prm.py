"""PRM training: stepwise rows -> a token-classification PRM in the annotate/prm.py format that PRMScorer loads."""

from __future__ import annotations

import json

from rag_dpo.agent.protocol import format_observation, format_step, render_prompt
from rag_dpo.records import ANSWER, SEARCH, Passage, Step


def test_prm_trains_and_scorer_loads(tmp_path, tiny_policy_dir, tokenizer):
    from datasets import Dataset

    from rag_dpo.annotate.prm import PRMScorer
    from rag_dpo.train.prm import PRMSettings, train_prm
    obs = format_observation([Passage("p1", "Paris", "Paris is the capital of France.")], tokenizer, 48)
    good = format_step("Search.", SEARCH, "capital of France")
    ans = format_step("Done.", ANSWER, "Paris")
    bad = format_step("Guess.", ANSWER, "Lyon")
    q = "What is the capital of France?"
    # every step labelled bad: the scorer must then call steps bad (label 1 = good in trainer and scorer alike)
    rows = [{"prompt": render_prompt(tokenizer, q), "completions": [good, obs + ans], "labels": [False, False],
             "completion_info_spans": [[], [[0, len(obs)]]]},
            {"prompt": render_prompt(tokenizer, q), "completions": [good, obs + bad], "labels": [False, False],
             "completion_info_spans": [[], [[0, len(obs)]]]}] * 2
    cfg = PRMSettings(max_steps=3, learning_rate=2e-2, per_device_train_batch_size=4, logging_steps=1,
                      precision="fp32", wandb=False, save_steps=10)
    out = train_prm(cfg, Dataset.from_list(rows), tmp_path / "prm", model=str(tiny_policy_dir))
    log = [r for r in json.loads((out / "train_log.json").read_text()) if "loss" in r]
    assert log[-1]["loss"] < log[0]["loss"]
    scorer = PRMScorer.load(out)
    s0 = Step("0", None, good, SEARCH, query="capital of France", observation=obs)
    scores = scorer.score(q, [s0], [Step("1", "0", ans, ANSWER, answer="Paris"), Step("2", "0", bad, ANSWER, answer="Lyon")])
    assert len(scores) == 2 and all(0.0 <= x <= 1.0 for x in scores)
    assert max(scores) < 0.3
