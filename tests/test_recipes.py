"""Every recipe under recipes/ (recursively) loads and validates; overrides work; typos are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rag_dpo.errors import InputError
from rag_dpo.pipeline.recipe import Recipe, load_recipe, resolved_dict, trainer_settings

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ALL = sorted(RECIPES.rglob("*.yaml"))


def test_the_named_recipes_exist():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"sft", "dpo_step", "dpo_outcome", "ppo_outcome", "ppo_process", "prm"} <= names
    assert list((RECIPES / "gpu").glob("*.yaml")) and (RECIPES / "accelerate" / "zero2.yaml").exists()


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(RECIPES)) for p in ALL])
def test_every_recipe_validates(path):
    if path.parent.name == "accelerate":   # accelerate's own loader reads them in test_distributed.py
        cfg = yaml.safe_load(path.read_text())
        assert cfg["distributed_type"] in ("DEEPSPEED", "MULTI_GPU", "MULTI_CPU")
        if path.stem.startswith("zero"):     # zero2.yaml / zero3.yaml: the DeepSpeed stage their name says
            assert cfg["distributed_type"] == "DEEPSPEED"
            assert cfg["deepspeed_config"]["zero_stage"] == int(path.stem[len("zero"):])
        return
    if path.name.startswith("compare"):   # compare.yaml, compare_full.yaml, gpu/compare_full_*.yaml
        from rag_dpo.pipeline.compare import load_compare_config
        for quick in (False, True):
            cfg = load_compare_config(path, quick=quick)   # validates every arm's recipe too
            assert load_recipe(RECIPES.parent / cfg.recipe, list(cfg.recipe_overrides))
        return
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.name == path.stem
    settings = trainer_settings(r)
    assert type(settings).__name__.lower().startswith(r.method)
    assert resolved_dict(r)["trainer"]["learning_rate"] == settings.learning_rate


def test_overrides_reach_typed_fields():
    r = load_recipe(RECIPES / "dpo_step.yaml", ["trainer.learning_rate=5e-6", "rollout.k=2",
                                                 "warm_start.trainer.lora.r=8", "trainer.loss_type=[ipo]"])
    s = trainer_settings(r)
    assert s.learning_rate == 5e-6 and s.loss_type == ["ipo"] and r.rollout.k == 2
    assert r.warm_start.trainer.lora.r == 8


@pytest.mark.parametrize("overrides,field", [(["trainer.learning_rat=1"], "trainer.learning_rat"),
                                             (["rollout.kk=3"], "rollout.kk"),
                                             (["method=rlhf"], "method"),
                                             (["trainer.beta=abc"], "trainer.beta"),
                                             (["rollout.k=0"], "rollout.k"),
                                             (["rollout.final_k=0"], "rollout.final_k"),
                                             # i.i.d. chains have no last depth of siblings: final_k would be ignored
                                             (["rollout.final_k=8", "rollout.search=sample"], "rollout.final_k")])
def test_bad_overrides_name_the_key(overrides, field):
    with pytest.raises(InputError) as e:
        load_recipe(RECIPES / "dpo_step.yaml", overrides)
    assert e.value.field == field


def test_recipes_that_share_the_warm_start_build_the_same_one():
    """One cached warm start serves these recipes only if everything its key hashes agrees: the warm_start block,
    and what makes the oracle chains (data file, split fractions, retrieval settings, model, seed)."""
    from rag_dpo.pipeline.recipe import to_dict

    def key_parts(name):
        d = to_dict(load_recipe(RECIPES / f"{name}.yaml"))
        return d["warm_start"], d["data"]["path"], d["data"]["fractions"], d["retrieval"], d["model"], d["seed"]
    shared = ["dpo_outcome", "sft", "ppo_process", "ppo_outcome", "retriever_strong"]
    assert all(key_parts(n) == key_parts("dpo_step") for n in shared)
    assert key_parts("retriever") != key_parts("dpo_step")   # the shipped retriever recipe keeps its own LoRA warm start
