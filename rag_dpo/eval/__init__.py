"""Eval stage: `evaluate` runs the baselines and the agent on one split and writes results.json / results.md /
chains.jsonl / a plot (`rag-dpo eval`, `make eval`); `stats` holds the comparison statistics."""
