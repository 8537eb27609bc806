"""The comparison's report: `results/<name>.md` and three PNG plots, built only from the finished runs' done
files (per-question scores, budgets, training curves), so a resumed or partial compare can always be reported.

What it shows, per method (baselines, warm start, every arm at the full budget): mean and 95 % bootstrap interval
of EM, F1, supporting-passage recall, steps and parse-error rate over seeds and test questions (see
`eval.stats` for how seeds are aggregated); each arm against the warm start it came from (paired, flagged when
below); paired tests of step-DPO vs outcome-DPO and of DPO vs PPO; the budgets each arm consumed; and the budget
curve. The verdict sentences are generated from the numbers, including when step-level supervision does not win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rag_dpo.eval.stats import bootstrap_ci, budget_mismatches, paired_bootstrap, seed_means
from rag_dpo.io import atomic_write_text

METRICS = ("em", "f1", "recall", "steps", "parse_error")
LABELS = {"em": "EM", "f1": "F1", "recall": "Support recall", "steps": "Steps", "parse_error": "Parse-error rate"}
PPO_BUDGET_SLACK = 0.10        # PPO samples whole chains, so it cannot stop at the pool's exact token count


class Method:
    """All evaluated runs of one method (one row of the table): rows by seed, keyed by question id."""

    def __init__(self, name: str, kind: str, family: str | None = None, main: bool = True):
        self.name, self.kind, self.family, self.main = name, kind, family, main
        self.by_seed: dict[int, dict[str, dict]] = {}
        self.runs: list[dict] = []

    def matrix(self, metric: str, qids: list[str], seeds: list[int] | None = None) -> np.ndarray:
        seeds = sorted(self.by_seed) if seeds is None else seeds
        return np.array([[float(self.by_seed[s][q][metric]) for q in qids] for s in seeds])


def collect_methods(data: dict) -> tuple[dict[str, Method], dict[float, dict[str, Method]]]:
    """Methods at the full budget (table rows, in plan order) and, per budget fraction, the curve's methods."""
    full: dict[str, Method] = {}
    for name in ["base", "iter-retgen", "warm-start"]:
        b = data["baselines"].get(name)
        if b is not None:
            m = full[name] = Method(name, "baseline")
            m.by_seed[0] = {r["question_id"]: r for r in b["rows"]}
    curve: dict[float, dict[str, Method]] = {}
    for run in data["runs"]:
        frac = float(run["fraction"])
        target = full if frac == 1.0 else curve.setdefault(frac, {})
        m = target.get(run["name"])
        if m is None:
            m = target[run["name"]] = Method(run["name"], "arm", run["arm"]["family"], run["arm"]["main"])
        m.by_seed[int(run["seed"])] = {r["question_id"]: r for r in run["rows"]}
        m.runs.append(run)
        if frac == 1.0 and run["arm"]["main"] and run["arm"]["family"] in ("step-dpo", "outcome-dpo"):
            curve.setdefault(1.0, {})[run["name"]] = m
    return full, curve


def _common_qids(methods) -> list[str]:
    sets = [set(rows) for m in methods for rows in m.by_seed.values()]
    return sorted(set.intersection(*sets)) if sets else []


def _fmt(mean: float, lo: float, hi: float, metric: str) -> str:
    if metric == "steps":
        return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def _paired(a: Method, b: Method, metric: str, qids: list[str], n_boot: int) -> dict | None:
    """Paired bootstrap on the seeds both have (a one-row baseline is paired with every seed of the arm)."""
    if a.kind == "baseline" or b.kind == "baseline":
        return paired_bootstrap(a.matrix(metric, qids), b.matrix(metric, qids), n_boot=n_boot, seed=0)
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    if not seeds:
        return None
    return paired_bootstrap(a.matrix(metric, qids, seeds), b.matrix(metric, qids, seeds), n_boot=n_boot, seed=0)


def _main(full: dict[str, Method], family: str, nll: float | None = None) -> Method | None:
    for m in full.values():
        if m.family != family:
            continue
        if nll is None and m.main:
            return m
        if nll is not None and m.runs and float(m.runs[0]["arm"]["nll_weight"]) == float(nll) and (
                family != "step-dpo" or m.runs[0]["arm"]["pairing"] == _main_rule(full)):
            return m
    return None


def _main_rule(full: dict[str, Method]) -> str | None:
    for m in full.values():
        if m.family == "step-dpo" and m.main:
            return m.runs[0]["arm"]["pairing"]
    return None


def write_report(data: dict, out_dir: Path, name: str, n_boot: int = 2000
                 ) -> tuple[dict[str, Path], tuple[list[str], list[list[Any]]]]:
    """Write `<out_dir>/<name>.md` and `<name>_{metrics,training_curves,budget_curve}.png`; returns the paths and
    the main table (columns, rows) for wandb."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = data["config"]
    full, curve = collect_methods(data)
    qids = _common_qids(full.values())
    warm = full.get("warm-start")
    lines: list[str] = []
    verdict: list[str] = []
    add = lines.append

    # ---- header: what was measured ------------------------------------------------------------------------
    n_arms = len([m for m in full.values() if m.kind == "arm"])
    n_runs = len(data["runs"])
    add(f"# Step-level vs outcome-only supervision: `{name}`\n")
    if cfg.get("quick"):
        add(f"> **Smoke run (`--quick`)**: {len(cfg['seeds'])} seed(s), {len(qids)} test questions, tiny training "
            "budgets. It checks that the pipeline runs end to end; its numbers are not evidence for or against "
            "step-level supervision.\n")
    if data.get("planned_runs"):
        add(f"> **Partial report**: {n_runs} of {data['planned_runs']} training runs finished so far (the compare "
            "is still running or was interrupted; rerun the same command to continue). Missing arms and tests "
            "are left out.\n")
    if len(cfg["seeds"]) < 3:
        add(f"> Only {len(cfg['seeds'])} seed(s) for the main arms (the default compare uses 3); intervals "
            "mostly reflect test-question noise, not run-to-run variation.\n")
    setup = data.get("setup") or {}
    add("## What was run\n")
    for key, val in setup.items():
        add(f"- {key}: {val}")
    add(f"- train questions in the shared rollout pool: {data.get('train_questions')}; "
        f"test questions scored: {len(qids)}")
    add(f"- arms: {n_arms} variants, {n_runs} training runs; main-arm seeds {cfg['seeds']}, "
        f"ablation seeds {cfg['ablation_seeds']}, budget-curve seeds {cfg['curve_seeds']}")
    from rag_dpo.pipeline.compare import FAMILIES
    left_out = [f for f in FAMILIES if f not in cfg.get("arms", FAMILIES)]
    if left_out:
        add(f"- **not in this compare** (`arms=` leaves them out): {', '.join(left_out)}")
    add(f"- machine: {data.get('machine', '?')}; summed run wall time {data.get('wall_s_total', 0) / 60:.1f} min "
        f"(this invocation {data.get('wall_s_this_invocation', 0) / 60:.1f} min)")
    add("- intervals: 95 % bootstrap over test questions and seeds (two-level; "
        f"{n_boot} replicates); paired tests resample per-question differences.\n")

    # ---- main table -----------------------------------------------------------------------------------------
    columns = ["method", "runs", *[LABELS[m] for m in METRICS], "ΔEM vs warm start", "note"]
    table: list[list[Any]] = []
    add("## Results on the test split (mean [95 % CI])\n")
    add("| " + " | ".join(columns) + " |")
    add("|" + "---|" * len(columns))
    below, no_data = [], []
    for m in full.values():
        cells = [m.name, f"{len(m.by_seed)}"]
        for metric in METRICS:
            cells.append(_fmt(*bootstrap_ci(m.matrix(metric, qids), n_boot=n_boot, seed=0), metric)
                         if qids else "n/a")
        note = ""
        if warm is not None and m is not warm and m.kind == "arm" and qids:
            res = _paired(m, warm, "em", qids, n_boot)
            cells.append(f"{res['diff']:+.3f} [{res['lo']:+.3f}, {res['hi']:+.3f}]")
            if res["diff"] < 0:
                sig = "significantly " if res["hi"] < 0 else ""
                note = f"⚠ {sig}below warm start (p={_fmt_p(res['p_value'])})"
                below.append(f"{m.name} ({res['diff']:+.3f} EM{', significant' if res['hi'] < 0 else ''})")
        else:
            cells.append("—")
        empty = [r for r in m.runs if r.get("no_data")]
        if empty:
            note = (note + "; " if note else "") + (f"⚠ no training data in {len(empty)} of {len(m.runs)} runs "
                                                    f"({empty[0]['no_data']}): scored as the warm start")
            no_data.append(m.name)
        if len(m.by_seed) > 1 and qids:
            note = (note + "; " if note else "") + "seed EMs " + "/".join(
                f"{x:.3f}" for x in seed_means(m.matrix("em", qids)))
        cells.append(note)
        table.append(cells)
        add("| " + " | ".join(str(c) for c in cells) + " |")
    add("")
    if below:
        verdict.append("Arms below the warm start they were trained from: " + ", ".join(below) + ".")
    elif warm is not None and n_arms:
        verdict.append("No arm scored below the warm start on EM.")
    if no_data:
        verdict.append("Arms the rollout pool gave no training data (no pairs / no right chains), so they are the "
                       "warm start unchanged and say nothing about their method: " + ", ".join(no_data) + ".")

    # ---- paired tests ---------------------------------------------------------------------------------------
    pairs: list[tuple[str, Method, Method]] = []
    for w in cfg.get("nll_weights", []):
        s, o = _main(full, "step-dpo", w), _main(full, "outcome-dpo", w)
        if s and o:
            pairs.append((f"step-DPO vs outcome-DPO (NLL weight {w:g})", s, o))
    for a, b in (("step-dpo", "process-ppo"), ("outcome-dpo", "outcome-ppo"), ("step-dpo", "outcome-ppo"),
                 ("outcome-dpo", "process-ppo")):
        ma, mb = _main(full, a), _main(full, b)
        if ma and mb:
            pairs.append((f"{a} vs {b}", ma, mb))
    s, o = _main(full, "process-ppo"), _main(full, "outcome-ppo")
    if s and o:
        pairs.append(("process-PPO vs outcome-PPO", s, o))
    add("## Paired tests (A − B on the same questions and seeds)\n")
    if pairs and qids:
        add("| comparison | A | B | ΔEM [95 % CI] | p | ΔF1 [95 % CI] | p |")
        add("|---|---|---|---|---|---|---|")
        for label, a, b in pairs:
            em, f1 = _paired(a, b, "em", qids, n_boot), _paired(a, b, "f1", qids, n_boot)
            if em is None:
                add(f"| {label} | {a.name} | {b.name} | no common seeds | | | |")
                continue
            empty = [m.name for m in (a, b) if m.runs and all(r.get("no_data") for r in m.runs)]
            shown = f"{label} (⚠ no training data: {', '.join(empty)})" if empty else label
            add(f"| {shown} | {a.name} | {b.name} | {em['diff']:+.3f} [{em['lo']:+.3f}, {em['hi']:+.3f}] | "
                f"{_fmt_p(em['p_value'])} | {f1['diff']:+.3f} [{f1['lo']:+.3f}, {f1['hi']:+.3f}] | "
                f"{_fmt_p(f1['p_value'])} |")
            if empty and (label.startswith("step-DPO vs outcome-DPO") or
                          label in ("step-dpo vs process-ppo", "outcome-dpo vs outcome-ppo")):
                verdict.append(f"{label}: not a comparison — {' and '.join(empty)} had no training data.")
            elif label.startswith("step-DPO vs outcome-DPO"):
                verdict.append(_sentence("Step-DPO", "outcome-DPO", label, em))
            elif label in ("step-dpo vs process-ppo", "outcome-dpo vs outcome-ppo"):
                verdict.append(_sentence(a.name, b.name, label, em))
    else:
        add("Not enough arms finished for paired tests.")
    add("")

    # ---- budgets --------------------------------------------------------------------------------------------
    add("## Budgets (what each arm's training data cost)\n")
    add("| arm | seed | questions | fraction | rollouts | generated tokens | pool budget (target) |")
    add("|---|---|---|---|---|---|---|")
    checks: dict[float, dict[str, dict]] = {}
    ppo_checks, ppo_rollouts = [], []
    ppo_seen = any(run["arm"]["family"].endswith("ppo") for run in data["runs"])
    for run in data["runs"]:
        b, t = run.get("budget") or {}, run.get("target_budget") or {}
        add(f"| {run['name']} | {run['seed']} | {b.get('questions', '?')} | {run['fraction']:g} | "
            f"{b.get('rollouts', '?')} | {b.get('generated_tokens', '?')} | "
            f"{t.get('questions', '?')} q / {t.get('rollouts', '?')} rollouts / {t.get('generated_tokens', '?')} tok |")
        if run["arm"]["family"].endswith("ppo"):
            ppo_checks.extend(f"{run['name']} s{run['seed']}: {p}" for p in budget_mismatches(
                {"pool": t, run["name"]: b}, keys=("questions",), rel_tol=0.0))
            ppo_checks.extend(f"{run['name']} s{run['seed']}: {p}" for p in budget_mismatches(
                {"pool": t, run["name"]: b}, keys=("generated_tokens",), rel_tol=PPO_BUDGET_SLACK))
            if b.get("rollouts") != t.get("rollouts"):
                ppo_rollouts.append(f"{run['name']} s{run['seed']} {b.get('rollouts')} vs pool {t.get('rollouts')}")
        else:
            checks.setdefault(float(run["fraction"]), {})[f"{run['name']} s{run['seed']}"] = b
    problems = [f"at {f:g} of the questions: {p}" for f, arms in sorted(checks.items())
                for p in budget_mismatches(arms)] + ppo_checks
    add("")
    if problems:
        add("**Budgets do not match**:\n")
        add("\n".join(f"- {p}" for p in problems))
        verdict.append("Budgets were NOT matched (see the budgets section); treat comparisons with care.")
    else:
        add("Budgets match: every SFT/DPO arm at the same question fraction trained on data costing the same "
            "questions, rollouts and generated tokens" +
            (f"; PPO arms stayed within {PPO_BUDGET_SLACK:.0%} of the pool's generated tokens on the same questions."
             if ppo_seen else "."))
        verdict.append("Budgets matched across arms.")
    if ppo_rollouts:
        add("\nPPO's rollout counts differ from the pool's by design (a tree-search chain counts as one rollout but "
            "holds k candidates per step; PPO samples group_size whole chains per question), so PPO is matched on "
            "generated tokens: " + "; ".join(ppo_rollouts) + ".")
    add("")

    # ---- budget curve ---------------------------------------------------------------------------------------
    add("## Budget curve (main step-DPO vs outcome-DPO arm, nested question subsets)\n")
    curve_rows = []
    if curve:
        add("| fraction | questions | step-DPO EM | outcome-DPO EM | Δ [95 % CI] | p |")
        add("|---|---|---|---|---|---|")
        for frac in sorted(curve):
            ms = curve[frac]
            s = next((m for m in ms.values() if m.family == "step-dpo"), None)
            o = next((m for m in ms.values() if m.family == "outcome-dpo"), None)
            nq = (s or o).runs[0]["questions"] if (s or o) and (s or o).runs else "?"
            cells = [f"{frac:g}", str(nq)]
            ci = {}
            for m in (s, o):
                if m is None or not qids:
                    cells.append("—")
                else:
                    ci[m.family] = bootstrap_ci(m.matrix("em", qids), n_boot=n_boot, seed=0)
                    cells.append(_fmt(*ci[m.family], "em"))
            res = _paired(s, o, "em", qids, n_boot) if s and o and qids else None
            cells += ([f"{res['diff']:+.3f} [{res['lo']:+.3f}, {res['hi']:+.3f}]", _fmt_p(res["p_value"])]
                      if res else ["—", "—"])
            curve_rows.append((frac, nq, ci))
            add("| " + " | ".join(cells) + " |")
    else:
        add("No budget-curve runs.")
    add("")

    # ---- plots ----------------------------------------------------------------------------------------------
    paths = {"report": out_dir / f"{name}.md", "metrics": out_dir / f"{name}_metrics.png",
             "training_curves": out_dir / f"{name}_training_curves.png",
             "budget_curve": out_dir / f"{name}_budget_curve.png"}
    _plot_metrics(full, qids, n_boot, paths["metrics"])
    _plot_training_curves(data["runs"], paths["training_curves"])
    _plot_budget_curve(curve_rows, paths["budget_curve"])
    add("## Plots\n")
    add(f"![metrics by method]({paths['metrics'].name})\n")
    add(f"![training curves]({paths['training_curves'].name})\n")
    add(f"![budget curve]({paths['budget_curve'].name})\n")

    head = lines[:lines.index("## What was run\n")]
    body = lines[len(head):]
    text = "\n".join(head + ["## Verdict (generated from the numbers below)\n"] + [f"- {v}" for v in verdict]
                     + [""] + body) + "\n"
    atomic_write_text(paths["report"], text)
    return paths, (columns, table)


def _sentence(a: str, b: str, label: str, res: dict) -> str:
    span = f"ΔEM {res['diff']:+.3f} [{res['lo']:+.3f}, {res['hi']:+.3f}], p={_fmt_p(res['p_value'])}"
    if res["lo"] > 0:
        return f"{label}: {a} beat {b} ({span})."
    if res["hi"] < 0:
        return f"{label}: {a} did NOT beat {b}; it was worse ({span})."
    return f"{label}: no significant difference — {a} did not demonstrably beat {b} ({span})."


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_metrics(full: dict[str, Method], qids: list[str], n_boot: int, path: Path) -> None:
    plt = _plt()
    names = list(full)
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * max(len(names), 4) + 1.5), sharey=True)
    for ax, metric in zip(axes, ("em", "f1", "recall")):
        stats = [bootstrap_ci(full[n].matrix(metric, qids), n_boot=n_boot, seed=0) if qids else (0, 0, 0)
                 for n in names]
        means = np.array([s[0] for s in stats])
        err = np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]])
        colors = ["#999999" if full[n].kind == "baseline" else
                  ("#1f77b4" if full[n].family in ("step-dpo", "process-ppo") else "#ff7f0e") for n in names]
        ax.barh(range(len(names)), means, xerr=err, color=colors, capsize=3)
        if "warm-start" in full:
            ax.axvline(means[names.index("warm-start")], color="k", ls="--", lw=1, label="warm start")
        ax.set_title(LABELS[metric] + " (95 % CI)")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Test-split metrics by method (blue: step-level signal, orange: outcome-level, grey: baselines)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve_key(points: list[dict]) -> str | None:
    keys = [k for k in (points[0] if points else {}) if k != "step"]
    for preferred in ("loss", "train_loss", "reward"):
        if preferred in keys:
            return preferred
    return keys[0] if keys else None


def _plot_training_curves(runs: list[dict], path: Path) -> None:
    plt = _plt()
    fams = [f for f in ("sft", "outcome-dpo", "step-dpo", "outcome-ppo", "process-ppo")
            if any(r["arm"]["family"] == f and r.get("curve") for r in runs)]
    ncols = min(3, max(len(fams), 1))
    nrows = max(1, -(-len(fams) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(fams):]:
        ax.set_axis_off()
    for ax, fam in zip(axes.flat, fams):
        for r in runs:
            if r["arm"]["family"] != fam or float(r["fraction"]) != 1.0 or not r.get("curve"):
                continue
            key = _curve_key(r["curve"])
            pts = [(p.get("step", i), p[key]) for i, p in enumerate(r["curve"]) if key in p]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, lw=1, marker="o", ms=3, alpha=0.9 if r["arm"]["main"] else 0.5,   # 1 step shows
                        label=f"{r['name']} s{r['seed']}")
                ax.set_ylabel(key)
        ax.set_title(fam)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    if not fams:
        axes[0][0].text(0.5, 0.5, "no training curves recorded", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_budget_curve(rows: list[tuple[float, Any, dict]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for fam, color, nudge in (("step-dpo", "#1f77b4", -0.008), ("outcome-dpo", "#ff7f0e", 0.008)):
        pts = [(frac, ci[fam]) for frac, _, ci in rows if fam in ci]
        if pts:
            xs = [p[0] + nudge for p in pts]       # side by side, so equal points do not hide each other
            means = [p[1][0] for p in pts]
            err = [[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]]
            ax.errorbar(xs, means, yerr=err, marker="o", capsize=3, color=color, label=fam)
    ax.set_xlabel("fraction of the train questions (nested subsets)")
    ax.set_ylabel("test EM (95 % CI)")
    ax.set_title("Budget curve: step-level vs outcome-level DPO")
    if rows:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
