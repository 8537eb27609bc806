"""Annotate stage: step annotators (outcome, evidence, rollout, judge, prm), RAG-Gym tree search, oracle chains,
and the annotator-agreement report. Heavy libraries (torch, transformers) are imported inside the functions."""

from rag_dpo.annotate.annotators import (ANNOTATORS, Annotator, AnnotatorConfig, JudgeConfig, annotate_file,
                                         build_annotator)
from rag_dpo.annotate.oracle import oracle_chains, oracle_report
from rag_dpo.annotate.tree_search import TreeSearchConfig, tree_search, tree_search_to_file

__all__ = ["ANNOTATORS", "Annotator", "AnnotatorConfig", "JudgeConfig", "annotate_file", "build_annotator",
           "oracle_chains", "oracle_report", "TreeSearchConfig", "tree_search", "tree_search_to_file"]
