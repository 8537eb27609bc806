"""How much of the answer does the passage token budget leave? Model-free: the tokenizer and the gold passages only.

For each question of a split whose gold answer a passage can state (not yes/no), the supporting passages are rendered
exactly as the agent would read them after a perfect retrieval (`protocol.format_observation`: title + text cut to
`max_tokens_per_passage` tokens) and `metrics.answer_seen` asks whether any gold alias is in there. The share per
budget is a ceiling on what any retrieval can put in front of the reader at that budget; the rest of the questions
can only be answered from memory or by a guess. Also prints the supporting passages' token lengths and how long the
warm start's oracle chains get (its SFT cuts rows at `max_length`).

    .venv/bin/python bench/passage_budget.py [--budgets 32,48,64,96,128,0] [--split test]
        [--fractions 0.55,0.1,0.35] [--out bench/results/passage_budget.json]

Budget 0 means uncut.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO / "data/hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--split", default="test")
    ap.add_argument("--fractions", default="0.55,0.1,0.35", help="the recipes' split (161 test questions)")
    ap.add_argument("--budgets", default="32,48,64,96,128,0")
    ap.add_argument("--oracle-split", default="train", help="split whose oracle chains are measured ('' skips)")
    ap.add_argument("--out", default=str(REPO / "bench/results/passage_budget.json"))
    a = ap.parse_args()

    from rag_dpo.agent.policy import load_tokenizer
    from rag_dpo.agent.protocol import format_observation, render_context
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.metrics import answer_seen
    ds = load_dataset(a.data)
    tok = load_tokenizer(a.model)
    budgets = [int(b) for b in a.budgets.split(",")]
    questions = split_questions(ds.questions, a.split, a.fractions)
    stated = [q for q in questions if answer_seen([], q.answers) is not None]
    gold = {q.id: [ds.corpus[p] for p in q.supporting_ids if p in ds.corpus] for q in stated}
    visible = {}
    for b in budgets:
        seen = [answer_seen([format_observation(gold[q.id], tok, b)], q.answers) for q in stated]
        visible[str(b or "uncut")] = {"share": sum(seen) / len(seen), "questions": int(sum(seen))}
    lengths = [len(tok(p.text, add_special_tokens=False)["input_ids"]) for q in stated for p in gold[q.id]]
    out = {"data": Path(a.data).name, "split": a.split, "fractions": a.fractions, "questions": len(questions),
           "yes_no": len(questions) - len(stated), "stated": len(stated), "answer_visible": visible,
           "passage_tokens": {"median": statistics.median(lengths),
                              **{f"share_over_{b}": sum(n > b for n in lengths) / len(lengths) for b in budgets if b}}}
    if a.oracle_split:
        from rag_dpo.annotate import oracle_chains
        from rag_dpo.retrieval import build_retriever
        retriever = build_retriever("bm25", ds.corpus)
        train = split_questions(ds.questions, a.oracle_split, a.fractions)
        out["oracle_chain_tokens"] = {}
        for b in budgets:
            if not b:
                continue
            chains = oracle_chains(train, ds.corpus, retriever, tokenizer=tok, k=3, max_tokens_per_passage=b)
            n = [len(tok(render_context(tok, c.question, c.steps))["input_ids"]) for c in chains]
            out["oracle_chain_tokens"][str(b)] = {"median": statistics.median(n), "max": max(n),
                                                  "over_768": sum(x > 768 for x in n), "chains": len(n)}
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                   text=True).stdout.strip()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{a.split} split: {len(questions)} questions, {out['yes_no']} with a yes/no answer; of the other "
          f"{len(stated)}, the answer is in the supporting passages as the agent reads them:")
    for b, v in visible.items():
        print(f"  passages cut at {b:>5} tokens: {v['share']:.3f} ({v['questions']})")
    print(f"  supporting passages: median {out['passage_tokens']['median']} tokens")
    for b, v in out.get("oracle_chain_tokens", {}).items():
        print(f"  oracle chains ({a.oracle_split}) at {b} tokens: median {v['median']}, max {v['max']}, "
              f"{v['over_768']} of {v['chains']} over 768")
    print(f"written: {a.out}")


if __name__ == "__main__":
    main()
