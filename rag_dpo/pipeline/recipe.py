"""Recipes: one YAML file per experiment (`recipes/*.yaml`), typed as `Recipe`, one section per stage.

A recipe names the model, the data and its split, the retriever, the warm start, the rollout pool (tree search or
sampled chains: the data budget), the step annotator, the pair builder, the trainer (`method` + `trainer`
section) and the evaluation. Every field can be overridden with dotted `key=value` arguments
(`rag-dpo train recipes/dpo_step.yaml trainer.learning_rate=5e-6`); unknown keys are errors naming the key.

`trainer` holds the settings of the recipe's `method` (SFTSettings, DPOSettings, PPOSettings or PRMSettings) and
is validated against that class when the recipe is loaded, so a typo there is caught before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag_dpo.annotate.annotators import AnnotatorConfig
from rag_dpo.config import apply_overrides, from_dict, load_yaml, to_dict
from rag_dpo.errors import InputError
from rag_dpo.pairs.builders import KINDS, PairConfig
from rag_dpo.train.dpo import DPOSettings
from rag_dpo.train.ppo import PPOSettings
from rag_dpo.train.prm import PRMSettings
from rag_dpo.train.retriever import RetrieverSettings
from rag_dpo.train.sft import SFTSettings

METHODS: dict[str, type] = {"sft": SFTSettings, "dpo": DPOSettings, "ppo": PPOSettings, "prm": PRMSettings,
                            "retriever": RetrieverSettings}   # retriever: pipeline/retriever_run.py (issue 15)
SEARCHES = ("tree", "sample")


@dataclass
class DataSection:
    path: str = "data/hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl"   # question file (relative to the repo ok)
    format: str | None = None          # loader format; None = detect
    corpus: str | None = None          # separate corpus file; None = the question file's own paragraphs
    fractions: str | None = None       # split fractions "train,dev,test" (default 0.7,0.15,0.15)
    train_split: str = "train"         # questions trained on (warm start, rollouts, PPO)
    eval_split: str = "dev"            # questions evaluated on


@dataclass
class RetrievalSection:
    name: str = "bm25"                 # bm25 | bm25s | dense | hybrid
    k: int = 3                         # passages per search
    max_tokens_per_passage: int = 48   # passage truncation inside observations (shorter = faster training)


@dataclass
class WarmStartSection:
    enabled: bool = True               # SFT on oracle chains of the train split before anything else
    questions: int | None = 120        # train questions whose oracle chains form the SFT data (None = all)
    trainer: SFTSettings = field(default_factory=SFTSettings)
    seed: int | None = None            # the warm start's own seed (None: the recipe's `seed`); fix it to run seeds of
                                       # a recipe from one shared warm start, as `make compare` does


def _default_cache() -> str:
    from rag_dpo.agent.rollout import default_cache
    return default_cache()


@dataclass
class RolloutSection:
    questions: int | None = 40         # train questions in the rollout pool (None = all) -- the data budget
    search: str = "tree"               # tree: K candidate steps per prefix, annotator picks the path; sample: K chains
    k: int = 4                         # candidates per prefix (tree) or sampled chains per question (sample)
    final_k: int | None = None         # tree: candidates at the last step, where the chain must answer (None = k):
                                       # right-vs-wrong answer pairs for the reader, at the cost of short answer steps
    finish: bool = False               # tree: also sample every losing search step on to a finished chain, so
                                       # outcome pairs and SFT get right/wrong chains from the same pool (costs tokens)
    max_steps: int = 3                 # steps per chain (searches + answer)
    max_new_tokens: int = 48           # generation budget of one step
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16               # rows per generate call
    dtype: str = "auto"                # pool rollouts: auto = bf16 where the hardware is fast at it (LoRA unmerged)
    cache: str = field(default_factory=_default_cache)
                                       # "prefix": key/value reuse across steps and siblings; "none": full
                                       # re-encoding (`generate`); default/"auto": the measured-faster one here
                                       # (reuse on a CPU, `generate` on CUDA: agent.rollout.default_cache)
    backend: str = "auto"              # hf | vllm | auto (vllm when installed, on a GPU, for a plain model)

    def __post_init__(self):
        if self.cache == "auto":        # recorded resolved (recipe.yaml), as RolloutConfig records it
            self.cache = _default_cache()


@dataclass
class AnnotateSection:
    name: str = "evidence"             # outcome | evidence | rollout | judge | prm
    settings: AnnotatorConfig = field(default_factory=AnnotatorConfig)


@dataclass
class PairsSection:
    kind: str = "step"                 # step | outcome | sft | stepwise; "oracle" (method sft): the warm start only
    settings: PairConfig = field(default_factory=PairConfig)


@dataclass
class AgentSection:
    variant: str = "flat"              # flat | hierarchical: a planner searches, a synthesizer answers from the
                                       # passages alone (eval runs agent-hier for agent; docs/variants.md)
    synthesizer_samples: int = 4       # hierarchical + dpo: sampled synthesizer answers per pool chain, paired by F1
    synthesizer_margin: float = 0.1    # hierarchical + dpo: minimum answer-F1 difference of a synthesizer pair


@dataclass
class EvalSection:
    limit: int | None = 40             # eval-split questions (None = all)
    methods: list[str] = field(default_factory=lambda: ["agent"])
    policies: list[str] = field(default_factory=lambda: ["base", "warm_start", "trained"])   # which to evaluate
    batch_size: int = 16


@dataclass
class Recipe:
    name: str = "recipe"               # run folders are runs/<name>[-<suffix>]
    method: str = "dpo"                # sft | dpo | ppo | prm -- the trainer of the main stage
    model: str = "smollm2"             # policy spec: bundled name, HF name/folder, or adapter folder
    seed: int = 0                      # seeds rollouts and trainers
    group: str | None = None           # wandb group (default: name); runs of one experiment share it
    data: DataSection = field(default_factory=DataSection)
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    warm_start: WarmStartSection = field(default_factory=WarmStartSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    annotate: AnnotateSection = field(default_factory=AnnotateSection)
    pairs: PairsSection = field(default_factory=PairsSection)
    trainer: dict[str, Any] = field(default_factory=dict)   # settings of `method` (see METHODS)
    eval: EvalSection = field(default_factory=EvalSection)
    agent: AgentSection = field(default_factory=AgentSection)


def trainer_settings(recipe: Recipe, file: str | None = None):
    """The typed settings of the recipe's main trainer (seeded with the recipe seed unless set)."""
    cls = METHODS.get(recipe.method)
    if cls is None:
        raise InputError(f"unknown method {recipe.method!r} (choose from {', '.join(METHODS)})", file=file,
                         field="method")
    data = dict(recipe.trainer or {})
    data.setdefault("seed", recipe.seed)
    return from_dict(cls, data, where="trainer", file=file)


def validate(recipe: Recipe, file: str | None = None) -> Recipe:
    trainer_settings(recipe, file)
    if recipe.pairs.kind not in KINDS + ("oracle",):
        raise InputError(f"unknown pairs kind {recipe.pairs.kind!r} (choose from {', '.join(KINDS)}, oracle)",
                         file=file, field="pairs.kind")
    if recipe.pairs.kind == "oracle" and recipe.method != "sft":
        raise InputError("pairs.kind 'oracle' (train on the warm start data only) needs method sft", file=file,
                         field="pairs.kind")
    if recipe.pairs.kind == "oracle" and not recipe.warm_start.enabled:
        raise InputError("pairs.kind 'oracle' trains the warm start: warm_start.enabled must be true", file=file,
                         field="warm_start.enabled")
    if recipe.rollout.cache not in ("prefix", "none"):
        raise InputError(f"unknown rollout cache {recipe.rollout.cache!r} (prefix, none or auto)", file=file,
                         field="rollout.cache")
    if recipe.rollout.search not in SEARCHES:
        raise InputError(f"unknown rollout search {recipe.rollout.search!r} (tree or sample)", file=file,
                         field="rollout.search")
    if recipe.rollout.k < 1:
        raise InputError(f"rollout.k must be at least 1, got {recipe.rollout.k}", file=file, field="rollout.k")
    if recipe.rollout.final_k is not None:
        if recipe.rollout.final_k < 1:
            raise InputError(f"rollout.final_k must be at least 1, got {recipe.rollout.final_k}", file=file,
                             field="rollout.final_k")
        if recipe.rollout.search != "tree":   # i.i.d. chains have no last depth of siblings: it would be ignored
            raise InputError("rollout.final_k applies to tree search (rollout.search: tree)", file=file,
                             field="rollout.final_k")
    if recipe.method == "prm" and recipe.pairs.kind != "stepwise":
        raise InputError("method prm trains on pairs.kind stepwise", file=file, field="pairs.kind")
    if recipe.method == "dpo" and recipe.pairs.kind not in ("step", "outcome"):
        raise InputError("method dpo trains on pairs.kind step or outcome", file=file, field="pairs.kind")
    from rag_dpo.agent.hierarchical import VARIANTS
    if recipe.agent.variant not in VARIANTS:
        raise InputError(f"unknown agent variant {recipe.agent.variant!r} (choose from {', '.join(VARIANTS)})",
                         file=file, field="agent.variant")
    if recipe.agent.variant == "hierarchical" and recipe.method == "dpo" and recipe.pairs.kind != "step":
        raise InputError("a hierarchical dpo recipe trains the planner on step pairs (pairs.kind step) and adds the "
                         "synthesizer's answer pairs to them", file=file, field="pairs.kind")
    bad = set(recipe.eval.policies) - {"base", "warm_start", "trained"}
    if bad:
        raise InputError(f"unknown policy {sorted(bad)[0]!r} (base, warm_start, trained)", file=file,
                         field="eval.policies")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """YAML recipe + dotted overrides -> validated Recipe (InputError naming file and key on any problem)."""
    data = load_yaml(path)
    apply_overrides(data, overrides or [])
    recipe = from_dict(Recipe, data, file=str(path))
    return validate(recipe, str(path))


# Trainer settings added after run folders and cache keys were first written (self-evaluation's two, 3aa41e2; the
# retriever's corpus_softmax and e2e_learning_rate): a run's recipe.yaml and the warm-start cache key record them only
# when set away from their default, so adding one does not make every earlier run folder refuse to resume or orphan
# every cached warm start (a 75-min rebuild on the CPU; both happened, unnoticed). A new trainer setting goes here,
# and so does a new RolloutConfig field (the cached warm-start eval's key, `run.cached_eval_key`, hashes it the same
# way); tests/test_pipeline.py pins both keys.
LATER_SETTINGS = ("self_eval", "self_eval_weight", "corpus_softmax", "e2e_learning_rate", "banned",
                  "self_eval_pool_rows", "share_prompt", "final_k")


def without_later_defaults(values: dict, settings) -> dict:
    """`values` (the asdict of `settings`) less the LATER_SETTINGS that are at their default."""
    default = type(settings)()
    return {k: v for k, v in values.items()
            if not (k in LATER_SETTINGS and hasattr(default, k) and v == getattr(default, k))}


def resolved_dict(recipe: Recipe) -> dict:
    """The recipe as a plain dict with the trainer section filled in with every default (what a run records; the
    LATER_SETTINGS only when set)."""
    out = to_dict(recipe)
    ts = trainer_settings(recipe)
    out["trainer"] = without_later_defaults(dataclasses.asdict(ts), ts)
    out["warm_start"]["trainer"] = without_later_defaults(out["warm_start"]["trainer"], recipe.warm_start.trainer)
    out["rollout"] = without_later_defaults(out["rollout"], recipe.rollout)
    if out["warm_start"].get("seed") is None:     # added later too: recipe.yaml as before unless it is set
        out["warm_start"].pop("seed", None)
    if out["agent"] == to_dict(AgentSection()):   # the flat agent: recipe.yaml as before the section existed, so
        out.pop("agent")                          # run folders made then still resume
    return out
