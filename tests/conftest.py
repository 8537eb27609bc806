"""Shared fixtures: a tiny randomly initialised Llama with SmolLM2's real tokenizer (tests/assets), and the
project's bundled data. Integration tests that need the real weights are marked `integration`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts OpenMP: no spinning on shared cores

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "smollm2_tokenizer"
REPO = Path(__file__).resolve().parent.parent
HOTPOT_DEV = REPO / "data" / "hotpotqa" / "ircot_hotpotqa_dev_subsampled_500.jsonl"


class ToyRetriever:
    """Deterministic stand-in retriever: passage ids picked by query length (no index to build)."""
    name = "toy"

    def __init__(self, corpus):
        self.ids = [p.id for p in corpus]

    def search(self, queries, k):
        return [[(self.ids[(len(q) + j) % len(self.ids)], 1.0 / (j + 1)) for j in range(k)] for q in queries]


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    from rag_dpo.agent.policy import tiny_policy
    return tiny_policy(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer[1]


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, tiny_model_and_tokenizer):
    """The tiny policy saved as a HF folder, for code paths that take a model path (CLI, trainers, eval)."""
    model, tok = tiny_model_and_tokenizer
    d = tmp_path_factory.mktemp("tiny_policy")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep index caches of tests out of the user's cache, but share them within the session (speed)."""
    monkeypatch.setenv("RAG_DPO_CACHE", str(tmp_path_factory.getbasetemp() / "rag_dpo_cache"))
    # The converted bundled policy is expensive (~20 s); integration tests reuse the user's copy when present.
    monkeypatch.setenv("RAG_DPO_MODEL_CACHE", os.environ.get("RAG_DPO_MODEL_CACHE",
                                                             str(Path.home() / ".cache" / "rag_dpo" / "models")))


def pytest_collection_modifyitems(config, items):
    import torch
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
