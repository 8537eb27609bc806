"""What `make eval` scores: the policy the user just trained, not a model that cannot follow the tag protocol.

`select_policies(runs_dir)` finds the latest finished recipe run of a method (default dpo: `make train-dpo` writes
runs/dpo_step) and returns its trained policy and warm start, with the data settings that run held out (data
file, corpus, split fractions, eval split, retriever, rollout budgets from its recipe.yaml), so the eval scores
questions the policy never saw and the split guard (training manifests) passes. With no such run it falls back
to the base model on the dev split, the old `make eval`. `rag-dpo eval-latest` evaluates each selected policy
into <out>/<name>/ and prints which policies were scored.

Design decisions: the eval stage must not import the pipeline, so the run folder is read by its file names
(`recipe.yaml`, `trained/train_done.json`, `warm_start/`), the layout documented in `pipeline/run.py`; "latest"
is the newest `trained/train_done.json` among runs/<name>/ folders whose recipe says the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rag_dpo.paths import DEFAULT_DATA

BASE_POLICY = "smollm2"


@dataclass
class Selection:
    policies: dict[str, str]                 # name -> policy spec, in the order they are scored
    run_dir: Path | None = None              # the run they come from (None: the base-model fallback)
    data: str = str(DEFAULT_DATA)
    corpus: str | None = None
    fractions: str | None = None
    split: str = "dev"
    retriever: str = "bm25"
    rollout: dict = field(default_factory=dict)   # RolloutConfig fields from the run's recipe

    def describe(self) -> str:
        names = ", ".join(f"{n} ({p})" for n, p in self.policies.items())
        src = f"the latest training run {self.run_dir}" if self.run_dir else \
            "no finished training run found, so the base model"
        return f"scoring {names}: {src}; {self.split} split of {self.data}"


def _recipe(run: Path) -> dict | None:
    from rag_dpo.config import load_yaml
    from rag_dpo.errors import InputError
    try:
        return load_yaml(run / "recipe.yaml")
    except InputError:
        return None


def latest_run(runs_dir: str | Path = "runs", method: str = "dpo") -> Path | None:
    """The runs/<name> folder with the newest finished `trained/` whose recipe.yaml has this method, or None."""
    best, best_t = None, -1.0
    root = Path(runs_dir)
    if not root.is_dir():
        return None
    for run in root.iterdir():
        done = run / "trained" / "train_done.json"
        if not done.exists() or not (run / "recipe.yaml").exists():
            continue
        recipe = _recipe(run)
        if not recipe or recipe.get("method") != method:
            continue
        t = done.stat().st_mtime
        if t > best_t:
            best, best_t = run, t
    return best


def select_policies(runs_dir: str | Path = "runs", method: str = "dpo", base: str = BASE_POLICY) -> Selection:
    """The trained policy and warm start of the latest `method` run with that run's eval settings, or the base
    model on the default data's dev split when there is none (see the module doc)."""
    run = latest_run(runs_dir, method)
    if run is None:
        return Selection({"base": base})
    recipe = _recipe(run) or {}
    data = recipe.get("data") or {}
    policies = {"trained": str(run / "trained")}
    ws = run / "warm_start"
    if (ws / "train_done.json").exists():
        policies["warm_start"] = str(ws)
    return Selection(policies, run_dir=run, data=_resolve(data.get("path")) or str(DEFAULT_DATA),
                     corpus=_resolve(data.get("corpus")), fractions=data.get("fractions"),
                     split=data.get("eval_split", "test"),
                     retriever=(recipe.get("retrieval") or {}).get("name", "bm25"), rollout=recipe_rollout(recipe))


def recipe_rollout(recipe: dict) -> dict:
    """The RolloutConfig fields a recipe's eval runs with (its rollout budgets, retrieval.k and passage budget,
    seed, eval batch size), only those the recipe sets."""
    ro, ret = recipe.get("rollout") or {}, recipe.get("retrieval") or {}
    return {k: v for k, v in {"max_steps": ro.get("max_steps"), "max_new_tokens": ro.get("max_new_tokens"),
                              "k": ret.get("k"), "max_tokens_per_passage": ret.get("max_tokens_per_passage"),
                              "seed": recipe.get("seed"),
                              "batch_size": (recipe.get("eval") or {}).get("batch_size")}.items() if v is not None}


def policy_run(policy: str) -> tuple[Path, dict] | None:
    """(run folder, recipe) when `policy` is a recipe run's `trained/` or `warm_start/` (a folder whose parent
    holds the run's recipe.yaml), else None. The path is not resolved: a run's warm_start is a link into the cache."""
    p = Path(policy)
    if p.name not in ("trained", "warm_start") or not p.is_dir():
        return None
    recipe = _recipe(p.parent) if (p.parent / "recipe.yaml").exists() else None
    return (p.parent, recipe) if recipe else None


def _resolve(path: str | None) -> str | None:
    """A recipe's repo-relative data path, found from any working directory."""
    if not path:
        return None
    from rag_dpo.paths import REPO_ROOT
    p = Path(path)
    return str(REPO_ROOT / p) if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists() else path


BASE_METHODS = "direct,rag,iter-retgen,agent"   # the base model cannot follow the tag protocol: the baselines too


def evaluate_latest(runs_dir: str | Path = "runs", method: str = "dpo", methods: str | None = None,
                    limit: int | None = 50, out_dir: str | Path = "runs/eval", device: str = "auto",
                    dtype: str = "float32") -> tuple[Selection, dict[str, dict]]:
    """Evaluate every policy of `select_policies` into out_dir/<name>/ with `methods` (default: the agent for a
    trained run, BASE_METHODS for the base model, whose baselines get worked examples); returns (selection,
    name -> results). An eval folder older than the policy it scored (the run was retrained since) is started
    over, not resumed."""
    import shutil

    from rag_dpo.agent.baselines import BASE_MODEL_SHOTS
    from rag_dpo.agent.rollout import RolloutConfig
    from rag_dpo.eval.evaluate import evaluate
    sel = select_policies(runs_dir, method)
    methods = methods or ("agent" if sel.run_dir else BASE_METHODS)
    print(sel.describe(), flush=True)
    results = {}
    for name, spec in sel.policies.items():
        out = Path(out_dir) / name
        done, chains = Path(spec) / "train_done.json", out / "chains.jsonl"
        if chains.exists() and done.exists() and chains.stat().st_mtime < done.stat().st_mtime:
            print(f"{out}: scored an earlier {name} policy; starting over", flush=True)
            shutil.rmtree(out)
        results[name] = evaluate(sel.data, corpus_path=sel.corpus, policy=spec, methods=methods, split=sel.split,
                                 limit=limit, out_dir=out, retriever=sel.retriever,
                                 rollout=RolloutConfig(**sel.rollout), fractions=sel.fractions, device=device,
                                 dtype=dtype, shots=0 if sel.run_dir else BASE_MODEL_SHOTS)
    return sel, results
