"""The data stage: load multi-hop QA files and corpora into `Question`/`Corpus`, split them deterministically,
and record which questions a model was trained on."""

from rag_dpo.data.corpus import align_to_corpus, load_corpus, passage_id
from rag_dpo.data.hub import load_hub_dataset
from rag_dpo.data.loaders import FORMATS, Dataset, dataset_from_rows, detect_format, load_dataset
from rag_dpo.data.manifest import (MANIFEST_NAME, TrainingManifest, check_not_trained_on, read_manifest,
                                   write_manifest)
from rag_dpo.data.splits import DEFAULT_FRACTIONS, SPLITS, assign_split, split_questions, split_sizes

__all__ = [
    "DEFAULT_FRACTIONS", "FORMATS", "MANIFEST_NAME", "SPLITS", "Dataset", "TrainingManifest", "align_to_corpus",
    "assign_split", "check_not_trained_on", "dataset_from_rows", "detect_format", "load_corpus", "load_dataset",
    "load_hub_dataset", "passage_id", "read_manifest", "split_questions", "split_sizes", "write_manifest",
]
