"""Pairs stage: labelled chain trees -> TRL-format datasets (step/outcome preference pairs, SFT rows, stepwise rows)."""

from rag_dpo.pairs.builders import KINDS, RULES, PairConfig, budget, build_dataset, build_rows, chain_text

__all__ = ["KINDS", "RULES", "PairConfig", "budget", "build_dataset", "build_rows", "chain_text"]
