"""Run a recipe end to end: warm start -> rollouts (+ step annotation) -> pairs -> train -> eval, in one run folder.

Each step is its own function taking the recipe and the run folder and returning what it produced, and each
skips work whose outputs already exist, so an interrupted run resumes (trainers also resume from their last
checkpoint). `compare` reuses these functions so every arm shares one warm start and one rollout pool.

Run folder layout (`runs/<name>`):
    recipe.yaml            the resolved recipe (every default filled in)
    data_hashes.json       sha256 of the question file, corpus and every chain file the run produced
    warm_start/            SFT adapter + tokenizer on oracle chains (+ training_manifest.json); data in warm_start_data/
    rollouts/labels.jsonl  the labelled rollout pool (tree search or sampled chains), rollouts/done.json = budget
    pairs/<kind>/          the training dataset (datasets save_to_disk + budget.json + question_ids.json)
    pairs/step+synthesizer/  agent.variant hierarchical (dpo): the step pairs + the synthesizer's answer pairs
    trained/               the trained adapter + tokenizer, train_log.json(l), train_curves.png, manifest
    eval/<policy>/         rag_dpo.eval output per policy; results.md / results.json: the table of all policies
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_dpo.errors import InputError
from rag_dpo.io import atomic_write_json, atomic_write_text, file_sha256
from rag_dpo.paths import REPO_ROOT
from rag_dpo.pipeline.recipe import Recipe, resolved_dict, trainer_settings, without_later_defaults


def log(msg: str) -> None:
    from rag_dpo.distributed import rank, world_size
    where = f" rank {rank()}/{world_size()}" if world_size() > 1 else ""   # a multi-process launch says who and how many
    print(f"[rag-dpo {time.strftime('%H:%M:%S')}{where}] {msg}", flush=True)


# ---- the shared world: questions, splits, corpus, retriever (built once per process) ---------------------------

@dataclass
class World:
    data_path: Path
    corpus: Any
    train: list        # Questions of the train split
    eval: list         # Questions of the eval split
    retriever: Any
    fractions: Any


_WORLDS: dict[tuple, World] = {}


def resolve_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def world(recipe: Recipe) -> World:
    """Load the recipe's data, split it, and build its retriever (cached per process)."""
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.retrieval import build_retriever
    d, r = recipe.data, recipe.retrieval
    key = (d.path, d.format, d.corpus, d.fractions, d.train_split, d.eval_split, r.name)
    if key not in _WORLDS:
        path = resolve_path(d.path)
        ds = load_dataset(path, format=d.format, corpus=resolve_path(d.corpus) if d.corpus else None)
        if ds.corpus is None:
            raise InputError("this dataset has no corpus of its own; set data.corpus", file=str(path),
                             field="data.corpus")
        fractions = d.fractions
        train = split_questions(ds.questions, d.train_split, fractions)
        evalq = split_questions(ds.questions, d.eval_split, fractions)
        retriever = build_retriever(r.name, ds.corpus)
        _WORLDS[key] = World(path, ds.corpus, train, evalq, retriever, fractions)
    return _WORLDS[key]


def warm_start_questions(recipe: Recipe) -> list:
    w = world(recipe)
    n = recipe.warm_start.questions
    return w.train if n is None else w.train[:n]


def pool_questions(recipe: Recipe) -> list:
    """Train questions of the rollout pool: the ones after the warm start's (wrapping round if too few)."""
    w = world(recipe)
    n = recipe.rollout.questions or len(w.train)
    start = len(warm_start_questions(recipe)) if recipe.warm_start.enabled else 0
    rest = w.train[start:] + w.train[:start]
    return rest[: min(n, len(rest))]


def release_memory() -> None:
    """Give freed trainer memory back to the OS between stages (glibc keeps it otherwise: a finished SFT stage
    left the process at ~6 GB RSS during the following rollouts on CPU)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _tokenizer(spec: str):
    from rag_dpo.agent.policy import load_tokenizer
    return load_tokenizer(spec)


# ---- steps ------------------------------------------------------------------------------------------------------

WARM_START_FORMAT = 1   # bump when the warm-start training code changes what a cached entry holds


def warm_start_settings(recipe: Recipe):
    """The warm start's SFT settings, seeded with `warm_start.seed` (default: the recipe's seed)."""
    ws = recipe.warm_start
    return dataclasses.replace(ws.trainer, seed=recipe.seed if ws.seed is None else ws.seed)


def warm_start_key(recipe: Recipe, chains_path: Path) -> str:
    """The cache key of a warm start: the model, the exact oracle chains it trains on (their sha256: question set,
    retrieval settings and split are all in there), the resolved SFT settings and the seed."""
    from rag_dpo.io import stable_hash
    trainer = warm_start_settings(recipe)
    settings = without_later_defaults(dataclasses.asdict(trainer), trainer)   # recipe.LATER_SETTINGS: at default, unhashed
    settings.pop("wandb", None)                     # reporting does not change the weights
    return stable_hash({"format": WARM_START_FORMAT, "model": recipe.model, "chains": file_sha256(chains_path),
                        "trainer": settings})


def warm_start(recipe: Recipe, run_dir: str | Path) -> Path | None:
    """SFT on oracle chains of the train split (`warm_start.questions` of them). Returns the adapter/model folder,
    or None when the recipe disables the warm start.

    Built once per `warm_start_key` in the cache (`rag_dpo.paths.cache_dir("warm_starts", key)`) and shared by every
    recipe and compare that asks for the same one (`make train-dpo`, `make train-sft`, `make train-ppo`,
    `make compare`): built in `<key>.building` (resumable from its checkpoints), checkpoints dropped, then renamed
    into place, so a finished entry is always whole; a lock file keeps two processes from building one entry at
    once. `run_dir/warm_start` is a symlink to the entry (an existing finished folder there is used as is)."""
    import shutil
    from contextlib import nullcontext

    from rag_dpo.data import write_manifest
    from rag_dpo.distributed import barrier, gather_objects, is_main
    from rag_dpo.paths import cache_dir
    from rag_dpo.train.common import is_done
    from rag_dpo.train.sft import train_sft
    if not recipe.warm_start.enabled:
        return None
    run_dir = Path(run_dir)
    out = run_dir / "warm_start"
    if is_done(out):
        log(f"warm start: done ({out.resolve()})")
        return out
    w = world(recipe)
    qs = warm_start_questions(recipe)
    data_dir = run_dir / "warm_start_data"
    chains_path = data_dir / "oracle.jsonl"
    tok = _tokenizer(recipe.model)
    if not chains_path.exists() and is_main():
        from rag_dpo.annotate import oracle_chains
        from rag_dpo.records import write_chains
        log(f"warm start: oracle chains for {len(qs)} train questions")
        chains = oracle_chains(qs, w.corpus, w.retriever, tokenizer=tok, k=recipe.retrieval.k,
                               max_tokens_per_passage=recipe.retrieval.max_tokens_per_passage)
        write_chains(chains_path, chains)
    barrier("warm start")
    key = warm_start_key(recipe, chains_path)
    root = cache_dir("warm_starts")
    entry = root / key
    # Under DDP every rank trains, but only rank 0 takes the lock (a rank waiting on it would hang rank 0's first
    # collective), decides whether to build (its answer is shared), and writes the entry.
    with _file_lock(root / f"{key}.lock") if is_main() else nullcontext():
        if not gather_objects([is_done(entry)], "warm start")[0]:
            sft_dir = data_dir / "sft"
            if not (sft_dir / "budget.json").exists() and is_main():
                from rag_dpo.pairs import PairConfig, build_dataset
                build_dataset(chains_path, "sft", sft_dir, tok, PairConfig(level="chain"))
            barrier("warm start")
            building = root / f"{key}.building"
            settings = warm_start_settings(recipe)
            log(f"warm start: SFT on {_rows(sft_dir)} oracle chains -> cache {entry}")
            t0 = time.perf_counter()
            train_sft(settings, sft_dir, building, model=recipe.model)
            release_memory()
            if is_main():
                write_manifest(building, [q.id for q in qs], data_files=[w.data_path],
                               info={"stage": "warm_start", "recipe": recipe.name, "key": key})
                atomic_write_json(building / "warm_start.json",
                                  {"key": key, "model": recipe.model, "questions": len(qs), "recipe": recipe.name,
                                   "build_minutes": round((time.perf_counter() - t0) / 60, 1),
                                   "trainer": dataclasses.asdict(settings),
                                   "autocast": _autocast(settings)})
                shutil.rmtree(building / "checkpoints", ignore_errors=True)   # optimizer states: GBs, never reused
                from rag_dpo.cards import write_model_card
                write_model_card(building)                                     # now with manifest + warm_start.json
                if entry.exists():
                    shutil.rmtree(entry)
                building.rename(entry)
            barrier("warm start")
        else:
            log(f"warm start: cached ({entry})")
            _warn_other_autocast(entry, warm_start_settings(recipe))
    if is_main():
        if out.is_symlink() or out.exists():
            out.unlink() if out.is_symlink() else shutil.rmtree(out)
        out.symlink_to(entry.resolve(), target_is_directory=True)
    barrier("warm start")
    return out


def _autocast(settings) -> str:
    from rag_dpo.train.common import use_bf16
    return "bf16" if use_bf16(settings.precision) else "fp32"


def _warn_other_autocast(entry: Path, settings) -> None:
    """`precision: auto` resolves per machine (bf16 where the CPU/GPU is fast at it) and the key hashes the setting,
    not what it resolved to, so a cache shared between machines can hand over a warm start trained the other way.
    Said, not refused: the weights are fp32 either way and a rebuild costs ~40 min on a CPU."""
    info = entry / "warm_start.json"
    built = json.loads(info.read_text()).get("autocast") if info.exists() else None
    here = _autocast(settings)
    if built and built != here:
        log(f"warm start: note: this entry was trained with {built} autocast, this machine would train it in {here} "
            f"(precision: {settings.precision}); delete {entry} to rebuild it here")


class _file_lock:
    """An exclusive flock on `path` for the with-block (released when the process dies, so never stale)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import fcntl
        self.fh = open(self.path, "a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def sampling_engine(recipe: Recipe, policy: str, seed: int | None = None):
    """The engine that samples `policy`'s pools (step pool, outcome pool, synthesizer answers), so every pool samples
    the same policy the same way: device, dtype, merged or unmerged adapter, KV cache, backend, sampling; `seed`
    (default the recipe's) seeds its draws. Returns (engine, model)."""
    from rag_dpo.agent.policy import load_policy
    from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine, resolve_device, resolve_dtype
    ro, w = recipe.rollout, world(recipe)
    # a merged LoRA generates ~2x faster on CPU; in bf16 the adapter stays unmerged (merging would round it away)
    device = resolve_device("auto")
    model, tok = load_policy(policy, device=device, dtype=resolve_dtype(ro.dtype, device), merge_adapter="auto")
    cfg = RolloutConfig(max_steps=ro.max_steps, k=recipe.retrieval.k, max_new_tokens=ro.max_new_tokens,
                        temperature=ro.temperature, top_p=ro.top_p, do_sample=True, batch_size=ro.batch_size,
                        seed=recipe.seed if seed is None else seed,
                        max_tokens_per_passage=recipe.retrieval.max_tokens_per_passage, cache=ro.cache,
                        backend=ro.backend)
    return RolloutEngine(model, tok, w.retriever, w.corpus, cfg, model_name=str(policy),
                         retriever_name=recipe.retrieval.name), model


def collect_rollouts(recipe: Recipe, run_dir: str | Path, policy: str, question_ids: list[str] | None = None,
                     out_dir: str | Path | None = None) -> Path:
    """The labelled rollout pool of `policy` on the pool questions (or `question_ids`): tree search guided by the
    recipe's annotator, or `k` sampled chains per question then annotated. Returns the labelled chains file
    (out_dir/labels.jsonl, default run_dir/rollouts); resumable per question; done.json holds the budget."""
    from rag_dpo.annotate import TreeSearchConfig, annotate_file, build_annotator, tree_search_to_file
    from rag_dpo.distributed import barrier, is_main
    from rag_dpo.pairs import budget
    from rag_dpo.records import read_chains

    out = Path(out_dir) if out_dir else Path(run_dir) / "rollouts"
    labels = out / "labels.jsonl"
    if (out / "done.json").exists():
        log(f"rollouts: done ({labels})")
        return labels
    out.mkdir(parents=True, exist_ok=True)
    w = world(recipe)
    qs = pool_questions(recipe)
    if question_ids is not None:
        wanted = set(question_ids)
        qs = [q for q in w.train if q.id in wanted]
    ro = recipe.rollout
    engine, model = sampling_engine(recipe, policy)
    annotator = build_annotator(recipe.annotate.name, recipe.annotate.settings, engine=engine)
    t0 = time.perf_counter()
    if ro.search == "tree":
        last = f" ({ro.final_k} at the last step)" if ro.final_k else ""
        log(f"rollouts: tree search, {ro.k} candidates per prefix{last}, {len(qs)} questions, annotator "
            f"{recipe.annotate.name}" + (", losing steps finished" if ro.finish else ""))
        # as many questions at a time as one decode batch holds with their k candidates each
        tree_search_to_file(qs, engine, annotator, labels,
                            TreeSearchConfig(k=ro.k, final_k=ro.final_k, max_steps=ro.max_steps, finish=ro.finish,
                                             batch_questions=engine.questions_per_call(ro.k)))
    else:
        raw = out / "chains.jsonl"
        log(f"rollouts: {ro.k} sampled chains for each of {len(qs)} questions")
        for g in range(ro.k):
            part = out / f"chains.{g}.jsonl"
            engine.cfg.seed = recipe.seed * 1009 + g
            engine.rollout_to_file(qs, part)
        if not raw.exists() and is_main():
            atomic_write_text(raw, "".join((out / f"chains.{g}.jsonl").read_text() for g in range(ro.k)))
        barrier("rollouts")
        annotate_file(raw, annotator, labels)
    spend = budget(read_chains(labels), recipe.annotate.name)
    spend["seconds"] = round(time.perf_counter() - t0, 1)
    if is_main():   # rank 0 alone writes; the stages above shard their questions across ranks
        atomic_write_json(out / "done.json", spend)
    barrier("rollouts")
    del engine, model
    release_memory()
    log(f"rollouts: {spend['chains']} chains, {spend['policy_steps']} steps, {spend['generated_tokens']:.0f} "
        f"generated tokens")
    return labels


def build_pair_datasets(recipe: Recipe, run_dir: str | Path, labels_path: str | Path,
                        question_ids: list[str] | None = None, out_dir: str | Path | None = None,
                        require_rows: bool = True) -> Path:
    """The training dataset of kind `recipe.pairs.kind` from the labelled pool (restricted to `question_ids` when
    given), with the recipe's pairing settings. Returns its folder (default run_dir/pairs/<kind>). An empty
    dataset is an error unless `require_rows` is false (compare records such an arm as "no training data")."""
    from rag_dpo.pairs import build_dataset
    from rag_dpo.records import read_chains, write_chains
    kind = recipe.pairs.kind
    out = Path(out_dir) if out_dir else Path(run_dir) / "pairs" / kind
    if (out / "budget.json").exists():
        log(f"pairs: done ({out}, {_rows(out)} rows)")
        return out
    from rag_dpo.distributed import barrier, is_main
    src = Path(labels_path)
    if is_main():   # rank 0 alone writes the dataset; the other ranks read it after the barrier
        if question_ids is not None:
            wanted = set(question_ids)
            src = out.with_name(out.name + ".labels.jsonl")
            write_chains(src, [c for c in read_chains(labels_path) if c.question_id in wanted])
        build_dataset(src, kind, out, _tokenizer(recipe.model), recipe.pairs.settings)
    barrier("pairs")
    n = _rows(out)
    log(f"pairs: {n} {kind} rows ({out})")
    if n == 0 and require_rows:
        raise InputError(f"no {kind} rows could be built from the rollout pool (all candidates tied or "
                         "near-duplicates); raise rollout.questions or rollout.k, or lower pairs.settings.margin",
                         file=str(labels_path), field="pairs")
    return out


def add_synthesizer_pairs(recipe: Recipe, run_dir: str | Path, labels_path: str | Path, policy: str,
                          step_data: str | Path) -> Path:
    """The hierarchical agent's DPO data (`agent.variant: hierarchical`): the step pairs train the planner (the
    flat agent's prompt); this adds the synthesizer's answer pairs (`agent.hierarchical.synthesizer_pairs`:
    `agent.synthesizer_samples` answers sampled by `policy` from each pool chain's passages, best vs worst F1) and
    writes both into run_dir/pairs/<kind>+synthesizer, one dataset for one model with two prompts."""
    from rag_dpo.distributed import barrier, is_main
    step_data = Path(step_data)
    out = Path(run_dir) / "pairs" / f"{step_data.name}+synthesizer"
    if (out / "budget.json").exists():
        log(f"synthesizer pairs: done ({out}, {_rows(out)} rows)")
        return out
    if is_main():
        from datasets import load_from_disk

        from rag_dpo.agent.hierarchical import synthesizer_pairs
        from rag_dpo.pairs.builders import save_dataset
        from rag_dpo.records import read_chains
        a = recipe.agent
        engine, model = sampling_engine(recipe, policy)   # the step pool's sampler (answer budget: the synthesizer's)
        rows, spent = synthesizer_pairs(engine, read_chains(labels_path), n=a.synthesizer_samples,
                                        margin=a.synthesizer_margin)
        step_rows = load_from_disk(str(step_data)).to_list()
        budget = {**json.loads((step_data / "budget.json").read_text()), **spent,
                  "step_rows": len(step_rows), "rows": len(step_rows) + len(rows)}
        budget["generated_tokens"] = budget.get("generated_tokens", 0) + spent["synthesizer_generated_tokens"]
        budget["questions_with_rows"] = len({r["question_id"] for r in step_rows + rows})
        config = {**json.loads((step_data / "config.json").read_text()),
                  "synthesizer_samples": a.synthesizer_samples, "synthesizer_margin": a.synthesizer_margin}
        save_dataset(step_rows + rows, "step", out,
                     {"budget.json": budget, "question_ids.json": json.loads((step_data / "question_ids.json")
                                                                             .read_text()), "config.json": config})
        del engine, model
        release_memory()
    barrier("synthesizer pairs")
    log(f"synthesizer pairs: {_rows(out)} rows with the step pairs ({out})")
    return out


def train_policy(recipe: Recipe, run_dir: str | Path, start_policy: str, data: str | Path | None,
                 out_dir: str | Path | None = None, question_ids: list[str] | None = None) -> Path:
    """Train the recipe's method from `start_policy` (a policy spec or adapter folder) on `data` (a pairs dataset
    folder; PPO ignores it and rolls out on the pool questions, or on `question_ids`; its generated-token budget
    is `trainer.max_generated_tokens`). Returns the output folder (default run_dir/trained) holding the adapter +
    tokenizer (a PRM folder for method prm), train_log.json(l), budget.json (PPO) and training_manifest.json."""
    from rag_dpo.data import write_manifest
    from rag_dpo.train.common import is_done
    out = Path(out_dir) if out_dir else Path(run_dir) / "trained"
    settings = trainer_settings(recipe)
    method = recipe.method
    if is_done(out) and (out / "training_manifest.json").exists():
        log(f"train ({method}): done ({out})")
        return out
    log(f"train ({method}): from {start_policy}")
    ids: list[str] = []
    files: list[Path] = [world(recipe).data_path]
    if method == "sft":
        from rag_dpo.train.sft import train_sft
        train_sft(settings, data, out, model=start_policy)
    elif method == "dpo":
        from rag_dpo.train.dpo import train_dpo
        train_dpo(settings, data, out, model=start_policy)
    elif method == "prm":
        from rag_dpo.train.prm import train_prm
        train_prm(settings, data, out, model=recipe.model)
    else:
        from rag_dpo.train.ppo import PPOInputs, train_ppo
        w = world(recipe)
        ro = recipe.rollout
        qs = pool_questions(recipe)
        if question_ids is not None:
            wanted = set(question_ids)
            qs = [q for q in w.train if q.id in wanted]
        inputs = PPOInputs(qs, w.corpus, w.retriever,
                           rollout={"max_steps": ro.max_steps, "k": recipe.retrieval.k,
                                    "max_new_tokens": ro.max_new_tokens, "top_p": ro.top_p,
                                    "batch_size": ro.batch_size, "seed": recipe.seed,
                                    "max_tokens_per_passage": recipe.retrieval.max_tokens_per_passage})
        train_ppo(settings, inputs, out, model=start_policy)
        ids = json.loads((out / "budget.json").read_text()).get("question_ids", [])
    if data is not None and method != "ppo":
        qfile = Path(data) / "question_ids.json"
        ids = json.loads(qfile.read_text()) if qfile.exists() else []
    release_memory()
    inherit = [start_policy] if Path(start_policy).is_dir() else []
    from rag_dpo.distributed import barrier, is_main
    if is_main():
        write_manifest(out, ids, data_files=files, inherit_from=inherit,
                       info={"method": method, "recipe": recipe.name, "start": str(start_policy)})
        from rag_dpo.cards import write_model_card
        write_model_card(out, recipe=resolved_dict(recipe))   # run_recipe adds the eval table once it has one
    barrier("training manifest")
    return out


# name -> (which policy runs it, eval method). A baseline measures its method, not whether a model follows a
# format: ITER-RETGEN and single-shot RAG run with the warm-start policy (the base model cannot follow the tag
# protocol: the old compare's ITER-RETGEN row on the base model had parse-error rate 1.0 and EM 0), and the base
# model gets the plain chat prompt of `agent.baselines` (answer accepted without tags) with its passages: `rag`.
BASELINE_EVALS = {"base": ("model", "rag"), "iter-retgen": ("warm_start", "iter-retgen"),
                  "rag": ("warm_start", "rag")}


def baseline_eval(recipe: Recipe, name: str, warm_start: str | None) -> tuple[str, str, int]:
    """(policy spec, eval method, worked examples) of a baseline row: see BASELINE_EVALS. Without a warm start
    every baseline runs on the recipe's model, with `agent.baselines.BASE_MODEL_SHOTS` examples (the warm start,
    trained on the answer format, gets none)."""
    from rag_dpo.agent.baselines import BASE_MODEL_SHOTS
    if name not in BASELINE_EVALS:
        raise InputError(f"unknown baseline {name!r} (known: {', '.join(BASELINE_EVALS)})", field="baselines")
    who, method = BASELINE_EVALS[name]
    if who == "warm_start" and warm_start:
        return str(warm_start), method, 0
    return recipe.model, method, BASE_MODEL_SHOTS


def cached_eval_key(recipe: Recipe, methods: list[str], split: str, rcfg) -> str:
    """Everything the eval of a cached warm start depends on, hashed. The rollout settings enter as the recipe's
    trainer settings do (`recipe.without_later_defaults`): a RolloutConfig field added later goes into
    LATER_SETTINGS, so it changes the key only when set, and the cached evals (~5 min each) stay valid."""
    from rag_dpo.eval.evaluate import prompts_fingerprint
    from rag_dpo.io import stable_hash
    w = world(recipe)
    return stable_hash({"data": file_sha256(w.data_path), "corpus": recipe.data.corpus, "split": split,
                        "fractions": recipe.data.fractions, "limit": recipe.eval.limit, "methods": sorted(methods),
                        "retriever": recipe.retrieval.name,
                        "rollout": without_later_defaults(dataclasses.asdict(rcfg), rcfg),
                        "prompts": prompts_fingerprint()})


def _cached_eval_dir(recipe: Recipe, spec: str | None, methods: list[str], split: str, rcfg) -> Path | None:
    """Where the eval of a cached warm start lives (inside its cache entry, keyed by `cached_eval_key`), so
    `make train-dpo` reruns and other recipes with the same eval settings score it once. None for any policy that
    is not a warm-start cache entry. The prompts' fingerprint is in the key: a finished eval is reused without
    calling `evaluate` (whose own resume check would see a prompt edit)."""
    from rag_dpo.paths import cache_dir
    if not spec or not Path(spec).is_dir():
        return None
    entry = Path(spec).resolve()
    if entry.parent != cache_dir("warm_starts").resolve():
        return None
    d = entry / "eval" / cached_eval_key(recipe, methods, split, rcfg)
    d.mkdir(parents=True, exist_ok=True)
    return d


def training_summary(folders: dict[str, Path | str | None]) -> dict:
    """name -> what its train_done.json says about the run's health (collapse flags and the numbers behind them)
    and, for DPO, its pairs (`train.dpo.pair_stats`): what summary.json and reports show next to the scores."""
    out = {}
    for name, folder in folders.items():
        done = Path(folder) / "train_done.json" if folder else None
        if done is None or not done.exists():
            continue
        d = json.loads(done.read_text())
        out[name] = {k: d[k] for k in ("health", "pairs", "global_step") if k in d}
    return out


def eval_rollout_config(recipe: Recipe, batch_size: int | None = None):
    """The agent's greedy eval settings from a recipe (its rollout budgets, retrieval k, eval batch size)."""
    from rag_dpo.agent.rollout import RolloutConfig
    ro = recipe.rollout
    return RolloutConfig(max_steps=ro.max_steps, k=recipe.retrieval.k, max_new_tokens=ro.max_new_tokens,
                         do_sample=False, batch_size=batch_size or recipe.eval.batch_size, seed=recipe.seed,
                         max_tokens_per_passage=recipe.retrieval.max_tokens_per_passage)


def evaluate_policies(recipe: Recipe, run_dir: str | Path, policies: dict[str, str | None],
                      methods: list[str] | None = None, split: str | None = None, shots: int = 0) -> dict[str, dict]:
    """Evaluate each named policy (name -> spec; None entries are skipped) with rag_dpo.eval.evaluate on `split`
    (default the recipe's eval split) into run_dir/eval/<name>/ (results.json, chains.jsonl, ...); writes
    run_dir/results.{json,md} with the table and a plain statement of trained vs warm start. Returns
    name -> {method -> metrics}. `shots`: the baselines' worked examples (a cached warm start's eval is reused
    only without them)."""
    from rag_dpo.agent.hierarchical import variant_methods
    from rag_dpo.distributed import gather_objects, is_main
    from rag_dpo.eval.evaluate import evaluate
    run_dir = Path(run_dir)
    w = world(recipe)
    e = recipe.eval
    methods = variant_methods(list(methods or e.methods), recipe.agent.variant)   # hierarchical: agent-hier
    split = split or recipe.data.eval_split
    policies = {k: v for k, v in policies.items() if v}
    table: dict[str, dict] = {}
    from contextlib import nullcontext
    for name, spec in policies.items():
        out = run_dir / "eval" / name
        res_file = out / "results.json"
        rcfg = eval_rollout_config(recipe)
        cached = None if shots else _cached_eval_dir(recipe, spec, methods, split, rcfg)
        if cached is not None:
            spec = str(Path(spec).resolve())          # one policy string, whichever run folder links the entry
            if out.is_symlink() and out.resolve() != cached.resolve() and is_main():
                out.unlink()                              # a link to a deleted or older cache entry
            if not out.exists() and is_main():
                out.parent.mkdir(parents=True, exist_ok=True)
                out.symlink_to(cached, target_is_directory=True)
        # Under a multi-process launch every rank evaluates its shard, but only rank 0 takes the lock (a rank
        # waiting on it would hang rank 0's first collective) and decides whether the eval is done (shared).
        lock = _file_lock(cached.with_name(cached.name + ".lock")) if cached is not None and is_main() else None
        with lock or nullcontext():
            if gather_objects([res_file.exists()] if is_main() else [], f"eval {name}")[0]:
                log(f"eval {name}: done ({out.resolve()})")
                res = json.loads(res_file.read_text())
            else:
                log(f"eval {name}: {spec} on {e.limit or 'all'} {split} questions")
                from rag_dpo.agent.policy import load_policy
                res = evaluate(str(w.data_path), recipe.data.corpus, policy=str(spec), methods=methods,
                               split=split, limit=e.limit, out_dir=out, retriever=recipe.retrieval.name,
                               rollout=rcfg, fractions=recipe.data.fractions, use_wandb=False, shots=shots,
                               model_and_tokenizer=load_policy(str(spec), merge_adapter=True))
        table[name] = metrics_by_method(res)
        release_memory()
    if not is_main():   # rank 0 alone writes the run's results files
        return table
    paired = paired_comparison(run_dir, policies, methods)
    summary = results_markdown(recipe, table, paired, training_summary({"trained": policies.get("trained")}))
    atomic_write_json(run_dir / "results.json", table)
    if paired:
        atomic_write_json(run_dir / "paired.json", paired)
    atomic_write_text(run_dir / "results.md", summary)
    _log_results(table, run_dir)
    return table


METRICS = ("em", "f1", "support_recall", "answer_seen", "parse_error_rate", "steps")


def metrics_by_method(results: dict) -> dict[str, dict]:
    """method -> {metric: value} from an eval results dict (accepts `{"methods": {m: {...}}}` or `{m: {...}}`)."""
    methods = results.get("methods", results) if isinstance(results, dict) else {}
    out = {}
    for m, v in methods.items():
        if isinstance(v, dict):
            src = v.get("metrics", v)
            out[m] = {k: src[k] for k in src if isinstance(src[k], (int, float)) and not isinstance(src[k], bool)}
    return out


PAIRED_METRICS = (("em", "EM"), ("f1", "F1"), ("support_recall", "recall"))


def paired_comparison(run_dir: str | Path, policies: dict[str, str | None], methods: list[str],
                      n_boot: int = 2000) -> dict:
    """trained vs its reference (warm start, else base) on the same eval questions: per method and metric the
    paired difference with its 95 % bootstrap interval and p (`eval.stats.paired_bootstrap`), and for EM the
    minimum detectable difference at 80 % power. {} when either policy was not evaluated."""
    from rag_dpo.eval.evaluate import chain_scores
    from rag_dpo.eval.stats import min_detectable_effect, paired_bootstrap
    from rag_dpo.records import read_chains
    ref = "warm_start" if policies.get("warm_start") else "base"
    if not policies.get("trained") or not policies.get(ref):
        return {}
    run_dir = Path(run_dir)
    scores: dict[str, dict] = {}
    for name in ("trained", ref):
        path = run_dir / "eval" / name / "chains.jsonl"
        if not path.exists():
            return {}
        scores[name] = {(c.method, c.question_id): chain_scores(c) for c in read_chains(path)}
    out: dict = {"reference": ref}
    for m in methods:
        qids = sorted(q for (mm, q) in scores["trained"] if mm == m and (m, q) in scores[ref])
        if not qids:
            continue
        res: dict = {"questions": len(qids)}
        for key, _ in PAIRED_METRICS:
            a = [scores["trained"][(m, q)][key] for q in qids]
            b = [scores[ref][(m, q)][key] for q in qids]
            res[key] = paired_bootstrap(a, b, n_boot=n_boot)
            if key == "em":
                res[key]["mde"] = min_detectable_effect(a, b)["mde"]
        stated = [q for q in qids if scores[ref][(m, q)]["answer_seen"] is not None]   # not yes/no: same for both
        if stated:   # a diagnostic, not a verdict: did the trained policy put the answer in front of itself more?
            res["answer_seen"] = {**paired_bootstrap([scores["trained"][(m, q)]["answer_seen"] for q in stated],
                                                     [scores[ref][(m, q)]["answer_seen"] for q in stated],
                                                     n_boot=n_boot), "questions": len(stated)}
        out[m] = res
    return out


def results_markdown(recipe: Recipe, table: dict[str, dict], paired: dict | None = None,
                     training: dict | None = None) -> str:
    """The policy x metric table, how the trained policy compares with the policy it started from, and what its
    training log says about how far it moved (`training`: `training_summary`'s entry per policy)."""
    methods = sorted({m for t in table.values() for m in t})
    keys = [k for k in METRICS if any(k in t.get(m, {}) for t in table.values() for m in methods)]
    if not keys:
        keys = sorted({k for t in table.values() for m in methods for k in t.get(m, {})})[:6]
    lines = [f"# {recipe.name}: {recipe.method} on {Path(recipe.data.path).name} ({recipe.data.eval_split} split, "
             f"{recipe.eval.limit or 'all'} questions)", "",
             "| policy | method | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, t in table.items():
        for m in methods:
            if m in t:
                lines.append(f"| {name} | {m} | " + " | ".join(_fmt(t[m].get(k)) for k in keys) + " |")
    lines += ["", paired_verdict(recipe, paired) if paired else verdict(recipe, table)]
    lines += [health_line(name, t) for name, t in (training or {}).items() if t.get("health")]
    return "\n".join(lines) + "\n"


def health_line(name: str, training: dict) -> str:
    """One line from a training_summary entry: optimizer steps, DPO's preference fit at the end, collapse signs."""
    h = training["health"]
    parts = [f"{training['global_step']} optimizer steps"] if "global_step" in training else []
    if "reward_accuracy" in h:
        parts.append(f"preference fit over the last quarter of the logs: reward accuracy {h['reward_accuracy']:.2f}, "
                     f"margin {h.get('reward_margin', float('nan')):+.3f} (beta-scaled; accuracy near 0.5 and "
                     "margin near 0: the policy barely moved)")
    parts.append("collapse signs: " + ("; ".join(h["flags"]) if h.get("flags") else "none"))
    return f"\nTraining health ({name.replace('_', ' ')}): " + "; ".join(parts) + "."


def paired_verdict(recipe: Recipe, paired: dict) -> str:
    """One line per method: each paired difference with its 95 % interval; "better"/"worse" only when the interval
    excludes 0, otherwise "no detectable difference" with the smallest EM change this test could have seen."""
    ref = paired["reference"].replace("_", " ")
    out = []
    for m, res in paired.items():
        if m == "reference":
            continue
        parts, better, worse = [], [], []
        for key, label in PAIRED_METRICS:
            r = res[key]
            parts.append(f"Δ{label} {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] (p {r['p_value']:.3f})")
            if r["lo"] > 0:
                better.append(label)
            elif r["hi"] < 0:
                worse.append(label)
        words = ([f"better than the {ref} on {', '.join(better)}"] if better else []) + \
            ([f"worse than the {ref} on {', '.join(worse)}"] if worse else [])
        mde = res["em"].get("mde")
        tail = ("; ".join(words) + " (95 % interval excludes 0)") if words else \
            (f"no difference detectable at 95 % (this test could see ΔEM of about {mde:.3f} at 80 % power)"
             if mde == mde and mde is not None else "no difference detectable at 95 %")
        seen = res.get("answer_seen")
        diag = (f" Diagnostic: the gold answer was in the passages read on Δ {seen['diff']:+.3f} [{seen['lo']:+.3f}, "
                f"{seen['hi']:+.3f}] of the {seen['questions']} questions a passage can answer (not yes/no)."
                if seen else "")
        out.append(f"**{recipe.method.upper()}-trained policy vs the {ref}, {m}, paired over {res['questions']} "
                   f"{recipe.data.eval_split} questions:** " + ", ".join(parts) + f". {tail}.{diag}")
    return "\n\n".join(out)


def verdict(recipe: Recipe, table: dict[str, dict]) -> str:
    """Without per-question scores (no paired test possible) only the numbers, never a "better"/"worse"."""
    ref = "warm_start" if "warm_start" in table else "base"
    if "trained" not in table or ref not in table:
        return ""
    parts = []
    for m in table["trained"]:
        a, b = table["trained"][m], table[ref].get(m, {})
        for k in ("em", "f1"):
            if k in a and k in b:
                parts.append(f"{m} {k.upper()} {a[k]:.3f} vs {b[k]:.3f} ({a[k] - b[k]:+.3f})")
    return (f"**The {recipe.method.upper()}-trained policy vs the {ref.replace('_', ' ')} it started from** (no "
            "paired test, so no verdict): " + "; ".join(parts) + ".") if parts else ""


def _fmt(x) -> str:
    return "" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _log_results(table: dict[str, dict], run_dir: Path | None = None) -> None:
    """Into the open wandb run: eval/<policy>/<method>/<metric>, the eval/results table and the eval/chains table
    (every scored chain with its path; the names `rag-dpo dashboard` expects)."""
    try:
        import wandb
        run = wandb.run
    except Exception:
        run = None
    from rag_dpo import tracking
    rows, flat = [], {}
    for name, t in table.items():
        for m, metrics in t.items():
            rows.append([name, m] + [metrics.get(k) for k in METRICS])
            flat.update({f"eval/{name}/{m}/{k}": v for k, v in metrics.items()})
    tracking.log(run, flat)
    tracking.log_table(run, "eval/results", ["policy", "method", *METRICS], rows)
    if run is None or run_dir is None:
        return
    from rag_dpo.eval.evaluate import CHAIN_COLUMNS, chain_rows
    from rag_dpo.records import read_chains
    chains = []
    for name in table:
        path = Path(run_dir) / "eval" / name / "chains.jsonl"
        if path.exists():
            by_method: dict[str, list] = {}
            for c in read_chains(path):
                by_method.setdefault(c.method, []).append(c)
            chains += [[name, *r] for r in chain_rows(by_method)]
    tracking.log_table(run, "eval/chains", ["policy", *CHAIN_COLUMNS], chains)


def _rows(dataset_dir: Path) -> int:
    b = Path(dataset_dir) / "budget.json"
    return int(json.loads(b.read_text()).get("rows", 0)) if b.exists() else 0


def _data_hashes(recipe: Recipe, run_dir: Path) -> dict:
    w = world(recipe)
    hashes = {str(w.data_path): file_sha256(w.data_path)}
    if recipe.data.corpus:
        hashes[recipe.data.corpus] = file_sha256(resolve_path(recipe.data.corpus))
    for p in sorted(run_dir.rglob("*.jsonl")):
        if "eval" not in p.relative_to(run_dir).parts[:1] and "wandb" not in p.parts:
            hashes[str(p.relative_to(run_dir))] = file_sha256(p)
    return hashes


def prepare_run_dir(recipe: Recipe, run_dir: str | Path, restart: bool = False) -> Path:
    """Create (or reopen, for resume) the run folder; refuse to resume a folder made by a different recipe."""
    import shutil

    from rag_dpo.config import dump_yaml
    run_dir = Path(run_dir)
    text = dump_yaml(resolved_dict(recipe))
    old = run_dir / "recipe.yaml"
    if old.exists() and old.read_text() != text:
        if not restart:
            raise InputError("this run folder was started with a different recipe; pass --restart to start over "
                             "or --run-dir for a new folder", file=str(old))
    from rag_dpo.distributed import barrier, is_main
    if is_main():   # under a multi-process launch rank 0 alone clears and writes the folder
        if restart and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", text)
    barrier("run folder")
    return run_dir


def run_recipe(recipe: Recipe, run_dir: str | Path, restart: bool = False) -> dict:
    """Warm start -> rollouts -> pairs -> train -> eval for one recipe; returns {"policies", "results"}.
    A method `sft` recipe with pairs.kind `oracle` stops after the warm start (that *is* its trained policy)."""
    from rag_dpo import tracking
    from rag_dpo.distributed import is_main
    t0 = time.perf_counter()
    run_dir = prepare_run_dir(recipe, run_dir, restart)
    run = tracking.init_run(run_dir.name, resolved_dict(recipe), group=recipe.group or recipe.name,
                            job_type=recipe.method, dir=run_dir)
    try:
        log(f"run folder {run_dir}")
        w = world(recipe)
        log(f"data: {len(w.train)} train / {len(w.eval)} {recipe.data.eval_split} questions, "
            f"{len(w.corpus)} passages, retriever {recipe.retrieval.name}")
        ws = warm_start(recipe, run_dir)
        start = str(ws) if ws else recipe.model
        if recipe.pairs.kind == "oracle":
            trained = ws
        elif recipe.method == "ppo":
            trained = train_policy(recipe, run_dir, start, None)
        else:
            labels = collect_rollouts(recipe, run_dir, start)
            data = build_pair_datasets(recipe, run_dir, labels)
            if recipe.agent.variant == "hierarchical" and recipe.method == "dpo":
                data = add_synthesizer_pairs(recipe, run_dir, labels, start, data)
            trained = train_policy(recipe, run_dir, start, data)
        if is_main():
            atomic_write_json(run_dir / "data_hashes.json", _data_hashes(recipe, run_dir))
        policies = {"base": recipe.model, "warm_start": str(ws) if ws else None,
                    "trained": str(trained) if trained is not None else None}
        if recipe.method == "prm":
            policies["trained"] = None   # a PRM is not a policy; eval it through the prm annotator / agent-prm-bon
        chosen = {k: v for k, v in policies.items() if v and k in recipe.eval.policies}
        results = evaluate_policies(recipe, run_dir, chosen) if chosen and recipe.eval.limit != 0 else {}
        minutes = (time.perf_counter() - t0) / 60
        summary = {"run_dir": str(run_dir), "policies": policies, "results": results, "minutes": round(minutes, 1),
                   "training": training_summary({"warm_start": ws, "trained": trained})}
        paired_file = run_dir / "paired.json"
        if paired_file.exists():
            summary["paired"] = json.loads(paired_file.read_text())
        if not is_main():   # rank 0 alone writes the summary and prints the table
            return summary
        atomic_write_json(run_dir / "summary.json", summary)
        from rag_dpo.cards import write_model_card
        for name in ("warm_start", "trained"):   # README.md with hub metadata: recipe, data hashes, eval table
            if policies.get(name) and not (name == "trained" and policies[name] == policies["warm_start"]):
                write_model_card(policies[name], run_dir=run_dir, name=name)
        if results:
            print("\n" + (run_dir / "results.md").read_text(), flush=True)
        log(f"finished in {minutes:.1f} min; run folder {run_dir}")
        tracking.log(run, {"wall_minutes": minutes})
        return summary
    finally:
        tracking.finish(run)
