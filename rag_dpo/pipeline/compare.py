"""The step-level vs outcome-only comparison (`rag-dpo compare`, `make compare`).

One warm-started policy (built once, shared by every seed and arm) and, per seed, two pools on the same train
questions (`pools: separate`, the default):
- the *step pool*: tree search (K candidates per prefix, the recipe's step annotator picks the path); step-DPO
  trains on its sibling pairs;
- the *outcome pool*: whole chains sampled independently per question with no annotator
  (`annotate.sampled_pool`), per question as many generated tokens as the step pool spent there, the step
  annotator's own generation (Monte-Carlo continuations) included. SFT and outcome-DPO train on it, so the
  outcome-only arms never see a path the process annotator chose.
PPO arms roll out themselves, capped at the step pool's generated tokens. `pools: shared` is the named ablation
of the earlier design: one tree pool per seed (losing steps finished to whole chains) feeds every arm.

Seeds are independent runs: seed s samples its own pools (rollout seed s) and trains with data order s, so the
intervals cover pool variance too. One comparison is primary (`primary`, step-DPO vs outcome-DPO at the main
settings); every other test in the report is secondary and Holm-corrected (see `compare_report`).
Each arm is evaluated with the warm start and the baselines (the base model with a plain RAG prompt after two
worked examples, ITER-RETGEN run by the warm-start policy: `pipeline.run.BASELINE_EVALS`) on the held-out test
split; a budget curve can repeat the main step-DPO and outcome-DPO arms on nested question subsets.

The orchestration (which runs, resume, budgets, report) is separate from the work: it talks to a `CompareBackend`
(prepare the pool, train one arm, evaluate one policy), so it can be tested with fakes in a second. The real
backend, `PipelineBackend`, calls the pipeline steps of `pipeline/run.py`.

Resume: every finished run leaves `done.json` (its per-question scores, budget and training curve) in its folder;
a rerun reads those and trains only what is missing. The report is rebuilt from the done files every time.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rag_dpo.config import apply_overrides, from_dict, load_yaml, to_dict
from rag_dpo.errors import InputError
from rag_dpo.io import atomic_write_json, stable_hash

FAMILIES = ("sft", "outcome-dpo", "step-dpo", "outcome-ppo", "process-ppo")
POOL_MODES = ("separate", "shared")
PAIRING_RULES = ("best-vs-worst", "all-margin", "same-action")
BASELINES = ("base", "iter-retgen", "rag")   # how each runs: pipeline.run.BASELINE_EVALS
WARM_START = "warm-start"
METRICS = ("em", "f1", "recall", "steps", "parse_error")


@dataclass
class CompareConfig:
    """A comparison. Every field can be overridden on the command line (`seeds=[0,1]`)."""
    name: str = "compare"                    # run folder runs/compare/<name>, report <out_dir>/<name>.md, wandb group
    recipe: str = "recipes/dpo_step.yaml"    # base pipeline recipe: model, data, retriever, annotator, rollouts, trainer
    recipe_overrides: list[str] = field(default_factory=list)   # dotted overrides applied to that recipe
    # trainer settings per arm method (sft / dpo / ppo: SFTSettings, DPOSettings, PPOSettings fields). An arm whose
    # method is the base recipe's starts from the recipe's `trainer` section with these on top; other methods get
    # only these (a DPO recipe's `beta` means nothing to PPO).
    trainers: dict[str, dict] = field(default_factory=dict)
    arms: list[str] = field(default_factory=lambda: list(FAMILIES))   # families to train (subset of FAMILIES)
    pairing_rules: list[str] = field(default_factory=lambda: list(PAIRING_RULES))  # step-DPO variants
    main_pairing: str = "best-vs-worst"      # the step-DPO rule used for the main comparison and the budget curve
    nll_weights: list[float] = field(default_factory=lambda: [0.0, 1.0])   # every DPO arm runs with each
    main_nll_weight: float = 1.0             # the NLL weight of the main DPO arms
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])   # seeds of the main arm of every family
    ablation_seeds: list[int] = field(default_factory=lambda: [0])  # seeds of the other DPO variants
    budget_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # budget curve points
    curve_seeds: list[int] = field(default_factory=lambda: [0])   # seeds of budget-curve points below 1.0
    baselines: list[str] = field(default_factory=lambda: ["base", "iter-retgen"])  # evaluated next to the warm
                                             # start: base = the base model with a plain RAG prompt; iter-retgen /
                                             # rag = those methods run by the warm-start policy
    ppo_spend_budget: bool = True            # PPO keeps rolling out until it generated the pool's tokens (its
                                             # `iterations` are raised as needed); false: stop at `iterations`
    pools: str = "separate"                  # separate: step pool (tree search) for step arms, i.i.d. chains matched
                                             # on generated tokens for outcome arms; shared: one finished tree pool
                                             # feeds every arm (the ablation: outcome arms see annotator-chosen paths)
    outcome_max_chains: int = 32             # cap on i.i.d. chains per question in the outcome pool
    primary: list[str] = field(default_factory=lambda: ["step-dpo", "outcome-dpo"])   # THE comparison (main
                                             # variants; uncorrected); every other test is Holm-corrected
    budget_tolerance: float = 0.10           # relative slack on generated tokens between an arm's data and the step
                                             # pool's spend (i.i.d. chains and PPO cannot stop at an exact count)
    n_boot: int = 2000                       # bootstrap replicates for intervals and paired tests
    run_dir: str = "runs/compare"            # parent of the run folder
    out_dir: str = "results"                 # where the report and plots go
    quick: bool = False                      # set by --quick: a smoke run; the report says so
    quick_overrides: list[str] = field(default_factory=list)  # applied to this config by --quick
    quick_recipe_overrides: list[str] = field(default_factory=list)  # appended to recipe_overrides by --quick

    def validate(self, file: str | None = None) -> None:
        for a in self.arms:
            if a not in FAMILIES:
                raise InputError(f"unknown arm '{a}' (known: {', '.join(FAMILIES)})", file=file, field="arms")
        for r in self.pairing_rules:
            if r not in PAIRING_RULES:
                raise InputError(f"unknown pairing rule '{r}' (known: {', '.join(PAIRING_RULES)})", file=file,
                                 field="pairing_rules")
        if "step-dpo" in self.arms and self.main_pairing not in self.pairing_rules:
            raise InputError("main_pairing must be one of pairing_rules", file=file, field="main_pairing")
        if self.main_nll_weight not in self.nll_weights:
            raise InputError("main_nll_weight must be one of nll_weights", file=file, field="main_nll_weight")
        for b in self.baselines:
            if b not in BASELINES:
                raise InputError(f"unknown baseline '{b}' (known: {', '.join(BASELINES)})", file=file,
                                 field="baselines")
        if not self.seeds:
            raise InputError("at least one seed is needed", file=file, field="seeds")
        if self.pools not in POOL_MODES:
            raise InputError(f"unknown pools mode '{self.pools}' (known: {', '.join(POOL_MODES)})", file=file,
                             field="pools")
        if len(self.primary) != 2 or len(set(self.primary)) != 2 or any(f not in FAMILIES for f in self.primary):
            raise InputError(f"primary names two different families of {', '.join(FAMILIES)}", file=file,
                             field="primary")
        if self.outcome_max_chains < 1:
            raise InputError("outcome_max_chains must be >= 1", file=file, field="outcome_max_chains")
        if 1.0 not in [float(f) for f in self.budget_fractions]:
            raise InputError("budget_fractions must include 1.0 (all questions)", file=file, field="budget_fractions")
        for method, section in self.trainers.items():
            if method not in ("sft", "dpo", "ppo"):
                raise InputError(f"unknown trainer method '{method}' (sft, dpo, ppo)", file=file,
                                 field=f"trainers.{method}")
            if not isinstance(section, dict):
                raise InputError("expected a mapping of trainer settings", file=file, field=f"trainers.{method}")


def load_compare_config(path: str | Path, overrides: list[str] | None = None, quick: bool = False) -> CompareConfig:
    """YAML + dotted overrides -> CompareConfig; --quick applies the file's `quick_overrides` first (so explicit
    command-line overrides still win), appends `quick_recipe_overrides`, and names the run `<name>-quick`."""
    data = load_yaml(path)
    cfg = from_dict(CompareConfig, data, file=str(path))
    if quick:
        apply_overrides(data, cfg.quick_overrides)
        data["recipe_overrides"] = list(data.get("recipe_overrides") or []) + list(cfg.quick_recipe_overrides)
        data["quick"] = True
        data["name"] = f"{data.get('name', cfg.name)}-quick"
    apply_overrides(data, overrides or [])
    cfg = from_dict(CompareConfig, data, file=str(path))
    cfg.validate(file=str(path))
    check_recipes(cfg, file=str(path))
    return cfg


# ---- the runs --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """One training recipe variant: a family plus its pairing rule and NLL weight."""
    family: str                 # one of FAMILIES
    pairing: str | None = None  # step-DPO only
    nll_weight: float = 0.0     # DPO only: weight of the NLL term on the chosen completion
    main: bool = True           # the family's main variant (all seeds, budget curve, paired tests)

    @property
    def method(self) -> str:
        return self.family.split("-")[-1]           # sft | dpo | ppo

    @property
    def level(self) -> str:
        """What the training signal is computed from: `step` or `outcome` (PPO: its reward; SFT: outcome)."""
        return "step" if self.family in ("step-dpo", "process-ppo") else "outcome"

    @property
    def pool(self) -> str | None:
        """Which pool an SFT/DPO arm trains on (`step` or `outcome`); None for PPO, which rolls out itself."""
        return None if self.method == "ppo" else self.level

    @property
    def name(self) -> str:
        name = self.family
        if self.pairing:
            name += f"[{self.pairing}]"
        if self.method == "dpo":
            name += "+nll" if self.nll_weight else "-nll"
        return name


@dataclass(frozen=True)
class ArmRun:
    arm: Arm
    seed: int
    fraction: float = 1.0

    @property
    def slug(self) -> str:
        safe = (self.arm.name.replace("+nll", "_nll").replace("-nll", "_nonll").replace("[", "_")
                .replace("]", "").replace("-", "_"))
        return f"{safe}__s{self.seed}__q{int(round(self.fraction * 100)):03d}"


def plan_arms(cfg: CompareConfig) -> list[Arm]:
    arms = []
    for fam in cfg.arms:
        if fam == "step-dpo":
            for rule in cfg.pairing_rules:
                for w in cfg.nll_weights:
                    arms.append(Arm(fam, rule, float(w), rule == cfg.main_pairing and w == cfg.main_nll_weight))
        elif fam == "outcome-dpo":
            for w in cfg.nll_weights:
                arms.append(Arm(fam, None, float(w), w == cfg.main_nll_weight))
        else:
            arms.append(Arm(fam))
    return arms


def plan_runs(cfg: CompareConfig) -> list[ArmRun]:
    """Every training run, seed-major and within a seed the main arm of every family first, then the other DPO
    variants, then the budget curve: an interrupted compare (the report is rewritten after every run) already
    holds the main comparison for the first seed."""
    arms = plan_arms(cfg)
    seeds = list(dict.fromkeys(list(cfg.seeds) + list(cfg.ablation_seeds) + list(cfg.curve_seeds)))
    runs = []
    for seed in seeds:
        for arm in [a for a in arms if a.main] + [a for a in arms if not a.main]:
            if seed in (cfg.seeds if arm.main else cfg.ablation_seeds):
                runs.append(ArmRun(arm, seed, 1.0))
        for f in sorted(float(x) for x in cfg.budget_fractions):
            if f < 1.0 and seed in cfg.curve_seeds:
                for arm in arms:
                    if arm.main and arm.family in ("step-dpo", "outcome-dpo"):
                        runs.append(ArmRun(arm, seed, f))
    return runs


# ---- the backend -----------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    policy: str                                  # folder of the trained policy (adapter or full model)
    budget: dict[str, float]                     # what its training data cost (pair dataset's budget.json, PPO's own)
    curve: list[dict[str, float]] = field(default_factory=list)   # [{step, loss, ...}] from the trainer's log
    health: dict = field(default_factory=dict)   # collapse flags and preference fit (train_done.json's `health`)
    no_data: str = ""                            # why nothing was trained (the pool gave this arm no rows): the
                                                 # arm is then the warm start, and the report says so


class CompareBackend(Protocol):
    def prepare(self) -> list[str]:
        """The shared warm start; returns the pool's train question ids (every seed's pools use these)."""

    def pool_budget(self, seed: int, question_ids: list[str]) -> dict[str, float]:
        """What seed `seed`'s step pool spent (questions, rollouts, generated_tokens incl. the annotator's) on these
        questions: the budget every arm of that seed is matched to (the outcome pool, PPO's cap)."""

    def train(self, run: ArmRun, question_ids: list[str], budget: dict[str, float], out_dir: Path) -> TrainResult:
        """Train one arm from the warm start on its seed's pool (step or outcome) restricted to `question_ids`;
        `TrainResult.budget` is what its data cost plus `rows` (and `rows_by_action` for step pairs)."""

    def evaluate(self, name: str, policy: str | None, out_dir: Path) -> list[dict]:
        """Per-question rows {question_id, em, f1, recall, steps, parse_error} on the test split. `name` is a
        baseline (`warm-start`, `base`, `iter-retgen`) or an arm run's slug with `policy` its folder."""

    def describe(self) -> dict[str, Any]:
        """Model, data, retriever, sizes: printed at the top of the report."""


# ---- per-question scores from eval chains ----------------------------------------------------------------------

def question_scores(chains) -> list[dict]:
    """EM, F1, supporting-passage recall, number of steps and parse failure of each chain's selected path, and
    `answer_seen` (was the gold answer in the passages it read, as cut; None for a yes/no gold): the eval's
    `chain_scores`, except that an invalid step counts as a parse failure here even without a parse error."""
    from rag_dpo.eval.evaluate import chain_scores
    from rag_dpo.records import INVALID
    rows = []
    for c in chains:
        s = chain_scores(c)
        rows.append({"question_id": c.question_id, "em": s["em"], "f1": s["f1"], "recall": s["support_recall"],
                     "steps": s["steps"],
                     "parse_error": float(s["parse_error"] or any(st.action == INVALID for st in c.path())),
                     "answer_seen": s["answer_seen"]})
    return rows


def eval_chains_path(out_dir: str | Path, name: str) -> Path:
    """Where `PipelineBackend.evaluate(name, ..., out_dir)` leaves the evaluated chains."""
    return Path(out_dir) / "eval" / name / "chains.jsonl"


def backfill_answer_seen(rows: list[dict], chains_path: Path, reference: list[dict] | None = None) -> list[dict]:
    """Rows scored before `answer_seen` existed get it from the evaluated chains still on disk (or, for an arm
    scored as the warm start, from the warm start's rows); rows that cannot be backfilled are left without it,
    and the report says "not recorded". Nothing else in a row changes."""
    if not rows or all("answer_seen" in r for r in rows):
        return rows
    seen: dict[str, Any] = {}
    if reference is not None:
        seen = {r["question_id"]: r["answer_seen"] for r in reference if "answer_seen" in r}
    elif chains_path.exists():
        from rag_dpo.records import read_chains
        by_qid: dict[str, list] = {}
        for row in question_scores(read_chains(chains_path)):
            by_qid.setdefault(row["question_id"], []).append(row["answer_seen"])
        seen = {q: v[0] for q, v in by_qid.items() if len(v) == 1}     # one chain per question, or unknown
    if not all(r["question_id"] in seen for r in rows):
        return rows
    return [dict(r, answer_seen=seen[r["question_id"]]) for r in rows]


# ---- the orchestration -----------------------------------------------------------------------------------------

def settings_hashes(cfg: CompareConfig) -> tuple[str, str]:
    """What every run of a compare shares (base recipe settings and overrides, trainer sections, pool mode): a
    finished run made with other settings must not be mixed into the report. Returns (hash written into new done
    files, hash also accepted): the first hashes the recipe's parsed settings, so a comment or layout edit of the
    recipe file leaves finished runs valid; the second is the earlier hash of the file's text, which runs finished
    before 2026-12-07 carry."""
    from rag_dpo.pipeline.run import resolve_path
    recipe = resolve_path(cfg.recipe)
    rest: list[Any] = [list(cfg.recipe_overrides)]
    if cfg.trainers:
        rest.append(cfg.trainers)
    rest.append({"pools": cfg.pools, "outcome_max_chains": cfg.outcome_max_chains})
    if not recipe.exists():
        return stable_hash([cfg.recipe, *rest]), stable_hash([cfg.recipe, *rest])
    return (stable_hash([{"recipe": load_yaml(recipe)}, *rest]),
            stable_hash([recipe.read_text(encoding="utf-8"), *rest]))


def _read_done(path: Path, accepted: tuple[str, ...]) -> dict | None:
    import json
    if not path.exists():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None              # a done file is written atomically; an unreadable one means redo the run
    if done.get("settings_hash") not in accepted:
        raise InputError("this finished run was made with another base recipe or recipe_overrides; give the "
                         "compare a new `name=` or delete the run folder", file=str(path), field="settings_hash")
    return done


def run_compare(cfg: CompareConfig, backend: CompareBackend, progress: bool = True,
                report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) every baseline evaluation and arm run, then write the report. Returns the report's data.
    `report_only`: rebuild the report from the runs that finished (marked partial if any is missing); no work."""
    from tqdm.auto import tqdm

    from rag_dpo import tracking
    from rag_dpo.distributed import barrier, is_main
    from rag_dpo.eval.stats import nested_subsets
    from rag_dpo.pipeline.compare_report import write_report

    # Under a multi-process launch every rank runs every baseline and arm, one after the other (the stages shard
    # their questions and train as DDP); rank 0 alone writes done.json, the report and the summary, and a barrier
    # after each done.json keeps every rank's view of what is finished the same.
    started = time.time()
    run_dir = Path(cfg.run_dir) / cfg.name
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "compare_config.json", to_dict(cfg))
    barrier("compare")
    accepted = settings_hashes(cfg)
    shash = accepted[0]
    if report_only:
        qids, subsets = [], {}
    else:
        run = _open_run(cfg, f"{cfg.name}-shared", {"kind": "shared"}, tracking)   # the warm start reports into it
        qids = backend.prepare()
        tracking.finish(run)
        if not qids:
            raise InputError("the rollout pool has no train questions", field="recipe")
        subsets = nested_subsets(qids, cfg.budget_fractions, seed=0)

    evals = [WARM_START] + list(cfg.baselines)
    runs = plan_runs(cfg)
    bar = tqdm(total=len(evals) + len(runs), desc=f"compare {cfg.name}", disable=not progress or not is_main())
    baselines: dict[str, dict] = {}
    for name in evals:
        d = run_dir / "baselines" / name
        done = _read_done(d / "done.json", accepted)
        if done is None and report_only:
            continue
        if done is None:
            t0 = time.time()
            wb = _open_run(cfg, name, {"kind": "baseline", "name": name}, tracking)
            rows = backend.evaluate(name, None, d)
            done = {"name": name, "rows": rows, "wall_s": time.time() - t0, "settings_hash": shash}
            if is_main():
                atomic_write_json(d / "done.json", done)
            barrier("compare")
            _log_eval(wb, rows, tracking)
        done["rows"] = backfill_answer_seen(done["rows"], eval_chains_path(d, name))
        baselines[name] = done
        bar.update(1)

    results: list[dict] = []

    def report_data(finished: list[dict], partial: int | None = None) -> dict:
        return {"config": to_dict(cfg), "setup": backend.describe(), "baselines": baselines, "runs": finished,
                "train_questions": len(qids) or max((int(r.get("questions", 0)) for r in finished), default=0),
                "machine": machine_description(), "planned_runs": partial,
                "wall_s_this_invocation": time.time() - started,
                "wall_s_total": sum(float(x.get("wall_s", 0)) for x in list(baselines.values()) + finished)}

    for run in runs:
        d = run_dir / "arms" / run.slug
        done = _read_done(d / "done.json", accepted)
        if done is None and report_only:
            continue
        if done is None:
            bar.set_postfix_str(run.slug)
            t0 = time.time()
            wb = _open_run(cfg, run.slug, {"kind": "arm", **dataclasses.asdict(run.arm), "name": run.arm.name,
                                           "seed": run.seed, "fraction": run.fraction}, tracking)
            q = subsets[float(run.fraction)]
            target = backend.pool_budget(run.seed, q)
            trained = backend.train(run, q, target, d)
            if trained.no_data:   # nothing to train on: the arm is its warm start (no need to evaluate it again)
                print(f"[compare] {run.slug}: {trained.no_data}; scored as the warm start")
                rows = [dict(r) for r in baselines[WARM_START]["rows"]]
            else:
                rows = backend.evaluate(run.slug, trained.policy, d / "eval")
            done = {"slug": run.slug, "arm": dataclasses.asdict(run.arm), "name": run.arm.name,
                    "seed": run.seed, "fraction": run.fraction, "questions": len(q),
                    "question_ids_hash": stable_hash(q), "target_budget": target, "budget": trained.budget,
                    "curve": trained.curve, "health": trained.health, "policy": trained.policy,
                    "no_data": trained.no_data, "rows": rows,
                    "wall_s": time.time() - t0, "settings_hash": shash}
            if is_main():
                atomic_write_json(d / "done.json", done)
            barrier("compare")
            _log_eval(wb, rows, tracking, reference=baselines.get(WARM_START, {}).get("rows"))
            results.append(done)
            if len(results) < len(runs) and is_main():   # a long compare's report is current after every run, marked partial
                write_report(report_data(results, partial=len(runs)), Path(cfg.out_dir), cfg.name, n_boot=cfg.n_boot,
                             plots=False)
        else:
            ref = baselines.get(WARM_START, {}).get("rows") if done.get("no_data") else None
            done["rows"] = backfill_answer_seen(done["rows"], eval_chains_path(d / "eval", run.slug), ref)
            results.append(done)
        bar.update(1)
    bar.close()

    data = report_data(results, partial=len(runs) if len(results) < len(runs) else None)
    if not is_main():
        return data
    paths, (columns, table) = write_report(data, Path(cfg.out_dir), cfg.name, n_boot=cfg.n_boot)
    data["report"] = {k: str(v) for k, v in paths.items()}
    summary = tracking.init_run(f"{cfg.name}-summary", to_dict(cfg), group=cfg.name, job_type="summary",
                                dir=run_dir)
    tracking.log_table(summary, "compare/results", columns, table)
    for key, p in paths.items():
        if p.suffix == ".png":
            tracking.log_image(summary, f"compare/{key}", p)
    tracking.finish(summary)
    atomic_write_json(run_dir / "compare_results.json",
                      {k: v for k, v in data.items() if k not in ("baselines", "runs")})
    return data


def _open_run(cfg: CompareConfig, name: str, config: dict, tracking):
    """One wandb run per arm run / baseline, grouped by the compare name and opened before the work, so the
    trainers (HF/TRL callbacks, PPO's per-round log) report their curves into it."""
    return tracking.init_run(name, config, group=cfg.name, job_type=config.get("family", config["kind"]),
                             dir=Path(cfg.run_dir) / cfg.name)   # wandb adds /wandb


def _log_eval(run, rows: list[dict], tracking, reference: list[dict] | None = None) -> None:
    """eval/<metric> means; for an arm also eval/warm_start/<metric>, the warm start's mean on the same questions,
    which `rag-dpo dashboard` draws next to each arm's bar (wandb bar plots have no reference line)."""
    import numpy as np
    if rows:
        data = {f"eval/{m}": float(np.mean([r[m] for r in rows])) for m in METRICS}
        qids = {r["question_id"] for r in rows}
        ref = [r for r in reference or [] if r.get("question_id") in qids]
        if ref:
            data.update({f"eval/warm_start/{m}": float(np.mean([r[m] for r in ref])) for m in METRICS})
        for key, rs in (("eval/answer_seen", rows), ("eval/warm_start/answer_seen", ref)):
            stated = [float(r["answer_seen"]) for r in rs if r.get("answer_seen") is not None]   # not yes/no
            if stated:
                data[key] = float(np.mean(stated))
        tracking.log(run, data)
    tracking.finish(run)


def machine_description() -> str:
    import os
    try:
        import torch
        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:
        dev = "torch unavailable"
    return f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} CPU cores, {dev}), " \
           f"Python {platform.python_version()}".replace("  ", " ")


def arm_overrides(run: ArmRun) -> list[str]:
    """Dotted overrides (`pipeline/recipe.py` field names) that turn the base recipe into one arm's recipe. The seed
    sets the data order (`trainer.seed`) and PPO's rollout seed (`seed`); the seed's pools are built by the backend
    (the warm start is shared by all seeds). PPO's generated-token cap (`trainer.max_generated_tokens`) is added by
    the backend from the step pool's spend."""
    arm = run.arm
    out = [f"method={arm.method}", f"seed={run.seed}", f"trainer.seed={run.seed}"]
    if arm.method == "dpo":
        out += [f"pairs.kind={arm.level}", f"trainer.nll_weight={arm.nll_weight}",
                f"pairs.settings.rule={arm.pairing or 'best-vs-worst'}", "pairs.settings.dedup=true"]
    elif arm.method == "sft":
        out += ["pairs.kind=sft", "pairs.settings.level=chain"]
    else:
        out += [f"trainer.reward={'process' if arm.level == 'step' else 'outcome'}"]
    return out


def write_arm_recipe(recipe, out_dir: Path) -> None:
    """The arm's resolved recipe as `<arm folder>/recipe.yaml`, the layout of a recipe run, so `rag-dpo eval --policy
    <arm folder>/trained` scores the arm with the compare's rollout budgets and split (`eval.latest.policy_run`)."""
    from rag_dpo.config import dump_yaml
    from rag_dpo.io import atomic_write_text
    from rag_dpo.pipeline.recipe import resolved_dict
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / "recipe.yaml", dump_yaml(resolved_dict(recipe)))


def base_recipe_data(cfg: CompareConfig) -> dict:
    """The base recipe as a plain dict with `recipe_overrides` applied (before any arm's changes)."""
    from rag_dpo.pipeline.run import resolve_path
    data = load_yaml(resolve_path(cfg.recipe))
    apply_overrides(data, list(cfg.recipe_overrides))
    return data


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def arm_recipe(cfg: CompareConfig, run: ArmRun, extra: list[str] | None = None):
    """The validated `Recipe` of one arm run: base recipe + recipe_overrides, the method's trainer section
    (`trainers.<method>`, over the recipe's own `trainer` when the method is the same), `arm_overrides`, `extra`.
    A step arm (and every arm with `pools: shared`) names the pool's step annotator, so its dataset's budget.json
    counts what that annotator generated (as `pool_budget` does); an outcome arm on the i.i.d. pool names the
    `outcome` labels, which cost nothing."""
    from rag_dpo.pipeline.recipe import Recipe, validate
    data = base_recipe_data(cfg)
    method = run.arm.method
    own = dict(data.get("trainer") or {}) if data.get("method", "dpo") == method else {}
    data["trainer"] = _merge(own, dict(cfg.trainers.get(method) or {}))
    overrides = arm_overrides(run)
    if method != "ppo":
        annotator = (data.get("annotate") or {}).get("name", "evidence")
        if cfg.pools == "separate" and run.arm.pool == "outcome":
            annotator = "outcome"
        overrides.append(f"pairs.settings.annotator={annotator}")
    apply_overrides(data, overrides + list(extra or []))
    where = f"{cfg.recipe} (arm {run.arm.name})"
    return validate(from_dict(Recipe, data, file=where), where)


def base_recipe(cfg: CompareConfig):
    from rag_dpo.pipeline.recipe import Recipe, validate
    return validate(from_dict(Recipe, base_recipe_data(cfg), file=cfg.recipe), cfg.recipe)


def check_recipes(cfg: CompareConfig, file: str | None = None) -> None:
    """Build the base recipe and every planned arm's recipe once, so a field that does not exist (or a trainer
    setting the arm's method does not have) is an InputError now, not hours into the compare."""
    base_recipe(cfg)
    seed = cfg.seeds[0]
    for arm in plan_arms(cfg):
        arm_recipe(cfg, ArmRun(arm, seed), extra=["trainer.max_generated_tokens=1"] if arm.method == "ppo" else [])


class PipelineBackend:
    """The real backend: the pipeline steps of `pipeline/run.py`. The warm start is built once from the base recipe
    in `<run>/shared/warm_start`; seed s's pools go to `<run>/shared/pools/s<s>/{step,outcome}/labels.jsonl`
    (built when the seed's first arm needs them; `done.json` there marks a finished pool); every arm run gets its
    own folder with `pairs/<kind>/` (its pool restricted to its questions) and `trained/`, built from `arm_recipe`;
    evaluations go to `<folder>/eval/<name>/` on the base recipe's eval split and settings."""

    def __init__(self, cfg: CompareConfig):
        self.cfg = cfg
        self.recipe = base_recipe(cfg)
        check_recipes(cfg)
        self.root = Path(cfg.run_dir) / cfg.name
        self.shared = self.root / "shared"
        self.start: str | None = None
        self._qids: list[str] = []
        self._step_pools: dict[int, Path] = {}

    @property
    def step_annotator(self) -> str:
        return self.recipe.pairs.settings.annotator or self.recipe.annotate.name

    def prepare(self) -> list[str]:
        from rag_dpo.pipeline import run as steps
        self.shared.mkdir(parents=True, exist_ok=True)
        warm = steps.warm_start(self.recipe, self.shared)
        self.start = str(warm) if warm else self.recipe.model
        self._qids = sorted(q.id for q in steps.pool_questions(self.recipe))
        return list(self._qids)

    def pool_recipe(self, seed: int):
        """The base recipe with rollout seed `seed`; `pools: shared` finishes losing steps (outcome data in the
        tree), `separate` does not (the outcome arms have their own pool, and unfinished losers cost nothing)."""
        from rag_dpo.pipeline.recipe import Recipe, validate
        data = base_recipe_data(self.cfg)
        apply_overrides(data, [f"seed={seed}", f"rollout.finish={'true' if self.cfg.pools == 'shared' else 'false'}"])
        return validate(from_dict(Recipe, data, file=self.cfg.recipe), self.cfg.recipe)

    def step_pool(self, seed: int) -> Path:
        from rag_dpo.pipeline import run as steps
        if seed not in self._step_pools:
            out = self.shared / "pools" / f"s{seed}" / "step"
            self._step_pools[seed] = Path(steps.collect_rollouts(self.pool_recipe(seed), self.shared, self.start,
                                                                 out_dir=out))
        return self._step_pools[seed]

    def outcome_pool(self, seed: int) -> Path:
        """i.i.d. whole chains per question, matched per question on the step pool's generated tokens (policy +
        step annotator). With `pools: shared` the outcome arms read the step pool itself."""
        from rag_dpo.annotate.sampled_pool import sample_matched_pool, tokens_by_question
        from rag_dpo.distributed import barrier, is_main
        from rag_dpo.pairs.builders import budget
        from rag_dpo.pipeline import run as steps
        from rag_dpo.records import read_chains
        step = self.step_pool(seed)
        if self.cfg.pools == "shared":
            return step
        out = self.shared / "pools" / f"s{seed}" / "outcome"
        labels = out / "labels.jsonl"
        if (out / "done.json").exists():
            return labels
        out.mkdir(parents=True, exist_ok=True)
        recipe = self.pool_recipe(seed)
        targets = tokens_by_question(read_chains(step), self.step_annotator)
        w = steps.world(recipe)
        qs = [q for q in w.train if q.id in targets]
        steps.log(f"outcome pool s{seed}: i.i.d. chains for {len(qs)} questions, {sum(targets.values()):.0f} "
                  f"generated tokens to match")
        engine = self._engine(recipe, seed)
        t0 = time.perf_counter()
        sample_matched_pool(qs, engine, labels, targets, seed=seed, max_chains=self.cfg.outcome_max_chains)
        spend = budget(read_chains(labels), "outcome")
        spend["seconds"] = round(time.perf_counter() - t0, 1)
        spend["target_generated_tokens"] = float(sum(targets.values()))
        if is_main():
            atomic_write_json(out / "done.json", spend)
        barrier("outcome pool")
        del engine
        steps.release_memory()
        return labels

    def _engine(self, recipe, seed: int):
        """The step pool's engine settings (`pipeline.run.sampling_engine`), seeded by `seed`."""
        from rag_dpo.pipeline import run as steps
        return steps.sampling_engine(recipe, self.start, seed)[0]

    def pool_budget(self, seed: int, question_ids: list[str]) -> dict[str, float]:
        from rag_dpo.pairs.builders import annotator_of, budget
        from rag_dpo.records import read_chains
        path = self.step_pool(seed)
        keep = set(question_ids)
        chains = [c for c in read_chains(path) if c.question_id in keep]
        return budget(chains, annotator_of(chains, self.step_annotator, str(path)))

    def train(self, run: ArmRun, question_ids: list[str], budget: dict[str, float], out_dir: Path) -> TrainResult:
        import json

        from rag_dpo.eval.stats import read_budget
        from rag_dpo.pipeline import run as steps
        out_dir = Path(out_dir)
        if run.arm.method == "ppo":
            tokens = int(budget["generated_tokens"])
            extra = [f"trainer.max_generated_tokens={tokens}"]
            if self.cfg.ppo_spend_budget:
                # every sampled chain generates >= 1 token, so this many rounds always reach the token cap
                t = arm_recipe(self.cfg, run, extra).trainer
                per_round = int(t.get("questions_per_iteration", 8)) * int(t.get("group_size", 2))
                need = -(-tokens // max(1, min(per_round, len(question_ids) * int(t.get("group_size", 2)))))
                extra.append(f"trainer.iterations={max(int(t.get('iterations', 8)), need)}")
            recipe = arm_recipe(self.cfg, run, extra)
            write_arm_recipe(recipe, out_dir)
            policy = steps.train_policy(recipe, out_dir, self.start, None, question_ids=list(question_ids))
            spent = json.loads((policy / "budget.json").read_text(encoding="utf-8"))
            spent.pop("question_ids", None)
            spent.setdefault("rows", spent.get("rollouts", 0))   # PPO's training rows are the chains it sampled
        else:
            recipe = arm_recipe(self.cfg, run)
            write_arm_recipe(recipe, out_dir)
            pool = self.step_pool(run.seed) if run.arm.pool == "step" else self.outcome_pool(run.seed)
            data = steps.build_pair_datasets(recipe, out_dir, pool, question_ids=list(question_ids),
                                             require_rows=False)
            spent = read_budget(data)
            spent["pool"] = str(pool)
            if not spent.get("rows"):
                return TrainResult(policy="", budget=spent, no_data=f"0 {recipe.pairs.kind} rows from the "
                                                                   f"{run.arm.pool} pool's {len(question_ids)} "
                                                                   f"questions (seed {run.seed})")
            policy = steps.train_policy(recipe, out_dir, self.start, data)
        return TrainResult(policy=str(policy), budget=spent, curve=read_curve(policy), health=read_health(policy))

    def evaluate(self, name: str, policy: str | None, out_dir: Path) -> list[dict]:
        from rag_dpo.pipeline import run as steps
        from rag_dpo.records import read_chains
        method, shots = "agent", 0
        if name == WARM_START:
            policy = self.start
        elif name in BASELINES:   # a baseline measures its method, not whether a model follows the tag protocol
            policy, method, shots = steps.baseline_eval(self.recipe, name, self.start)
        if not policy:
            raise InputError(f"no policy to evaluate for {name!r}", field="policy")
        steps.evaluate_policies(self.recipe, out_dir, {name: str(policy)}, methods=[method], shots=shots)
        path = eval_chains_path(out_dir, name)
        if not path.exists():
            raise InputError("evaluation wrote no chains.jsonl", file=str(path))
        return question_scores([c for c in read_chains(path) if c.method == method])

    def describe(self) -> dict[str, Any]:
        r = self.recipe
        if self.cfg.pools == "separate":
            pools = (f"per seed, on the same {r.rollout.questions or 'all'} train questions: a step pool (tree search, "
                     f"k={r.rollout.k}, annotator {r.annotate.name}) for step-DPO, and an outcome pool of i.i.d. "
                     f"whole chains (no annotator) matched per question on the step pool's generated tokens "
                     f"(annotator's included) for SFT and outcome-DPO")
        else:
            pools = (f"ABLATION `pools: shared`: per seed one tree-search pool (k={r.rollout.k}, annotator "
                     f"{r.annotate.name}, losing steps finished to whole chains) feeds every arm, so the outcome "
                     f"arms learn from paths the step annotator chose")
        return {"model": r.model, "data": f"{r.data.path} (fractions {r.data.fractions or 'default'}; train split "
                                          f"{r.data.train_split}, eval split {r.data.eval_split}, "
                                          f"{r.eval.limit or 'all'} eval questions)",
                "retriever": f"{r.retrieval.name}, k={r.retrieval.k}",
                "pools": pools,
                "rollouts": f"max {r.rollout.max_steps} steps, temperature {r.rollout.temperature}; seed s samples "
                            f"its own pools (rollout seed s) and trains with data order s",
                "warm start": (f"SFT on {r.warm_start.questions or 'all'} oracle chains{self._autocast_text()}, "
                               "built once and shared by every seed (its variance is not in the intervals)")
                if r.warm_start.enabled
                else "none (arms start from the base model)",
                "baselines": "; ".join(f"{b} = {self._baseline_text(b)}" for b in self.cfg.baselines),
                "base recipe": self.cfg.recipe, "recipe overrides": list(self.cfg.recipe_overrides)}

    def _autocast_text(self) -> str:
        """How the warm start was trained, from its cache entry: the same key trains in bf16 autocast on a CPU or GPU
        with fast bf16 and in float32 elsewhere, so two machines' warm starts differ (test EM 0.211 vs 0.174 seen)."""
        info = Path(self.start) / "warm_start.json" if self.start else None
        if info is None or not info.exists():
            return ""
        autocast = json.loads(info.read_text()).get("autocast")
        return f" (trained in {autocast} autocast)" if autocast else ""

    def _baseline_text(self, name: str) -> str:
        """Who runs baseline `name` and how, by `pipeline.run.baseline_eval`'s rule (a placeholder stands for the
        warm start's folder, which a report-only run has not resolved)."""
        from rag_dpo.pipeline.run import baseline_eval
        warm = "the warm start" if self.recipe.warm_start.enabled else None
        policy, method, shots = baseline_eval(self.recipe, name, warm)
        who = "the warm start" if policy == warm else "the base model"
        return f"{who} running {method}" + (f" after {shots} worked examples" if shots else "")


CURVE_KEYS = ("loss", "reward", "outcome", "rewards/accuracies", "rewards/margins", "kl", "pg_loss")


def read_health(policy_dir: str | Path) -> dict:
    """The trainer's verdict on its own log (`train.common.health`: collapse flags, DPO's preference fit) and its
    optimizer steps, from `train_done.json`; {} if it is not readable (the report then shows a dash)."""
    from rag_dpo.pipeline.run import training_summary
    try:
        done = training_summary({"policy": policy_dir}).get("policy", {})
    except ValueError:
        return {}
    return {**done.get("health", {}), **({"global_step": done["global_step"]} if "global_step" in done else {})}


def read_curve(policy_dir: str | Path) -> list[dict[str, float]]:
    """Training curve points {step, loss, ...} from a trainer's `train_log.json` (HF log_history) or PPO's
    `train_log.jsonl` ({step, reward, outcome, kl, pg_loss, ...} per round); [] if neither is readable."""
    import json
    policy_dir = Path(policy_dir)
    path = policy_dir / "train_log.json"
    try:
        if path.exists():
            history = json.loads(path.read_text(encoding="utf-8"))
        elif (policy_dir / "train_log.jsonl").exists():
            history = [json.loads(line) for line in
                       (policy_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            return []
    except json.JSONDecodeError:
        return []
    if not isinstance(history, list):
        return []
    return [{"step": float(h.get("step", i)),
             **{k: float(h[k]) for k in CURVE_KEYS if isinstance(h.get(k), (int, float)) and not isinstance(h[k], bool)}}
            for i, h in enumerate(history) if isinstance(h, dict) and any(k in h for k in CURVE_KEYS)]
