"""The comparison's report: `results/<name>.md` and three PNG plots, built only from the finished runs' done
files (per-question scores, budgets, training curves), so a resumed or partial compare can always be reported.

What it shows, per method (baselines, warm start, every arm at the full budget): mean and 95 % bootstrap interval
of EM, F1, supporting-passage recall, steps and parse-error rate over seeds and test questions (see
`eval.stats` for how seeds are aggregated); each arm against the warm start it came from (paired, flagged when
below); whether the answer reached the reader (`answer_seen`, descriptive); the paired tests; the training rows
and budgets of every run and whether they match; the budget curve.
The verdict sentences are generated from the numbers, including when step-level supervision does not win.

Testing: one comparison is primary (config `primary`, step-DPO vs outcome-DPO main variants, EM) and is judged
at 5 % uncorrected; every other test in the report (its F1, the ablations, DPO vs PPO, each arm vs the warm
start, the budget curve) is secondary and judged on its Holm-corrected p. Each test prints the minimum
detectable effect at 80 % power from its observed discordance, so "no difference" says what it could have seen.
The same numbers go to `<out_dir>/<name>.json` (`results_json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rag_dpo.eval.stats import (bootstrap_ci, budget_mismatches, holm, min_detectable_effect, paired_bootstrap,
                                seed_means)
from rag_dpo.io import atomic_write_json, atomic_write_text

METRICS = ("em", "f1", "recall", "steps", "parse_error")
LABELS = {"em": "EM", "f1": "F1", "recall": "Support recall", "steps": "Steps", "parse_error": "Parse-error rate",
          "answer_seen": "Answer seen"}
PPO_BUDGET_SLACK = 0.10        # default budget tolerance: i.i.d. chains and PPO cannot stop at an exact token count


class Method:
    """All evaluated runs of one method (one row of the table): rows by seed, keyed by question id."""

    def __init__(self, name: str, kind: str, family: str | None = None, main: bool = True):
        self.name, self.kind, self.family, self.main = name, kind, family, main
        self.by_seed: dict[int, dict[str, dict]] = {}
        self.runs: list[dict] = []

    def matrix(self, metric: str, qids: list[str], seeds: list[int] | None = None) -> np.ndarray:
        seeds = sorted(self.by_seed) if seeds is None else seeds
        return np.array([[float(self.by_seed[s][q][metric]) for q in qids] for s in seeds])

    def recorded(self, metric: str, qids: list[str]) -> bool:
        return all(metric in rows[q] for rows in self.by_seed.values() for q in qids)


def collect_methods(data: dict) -> tuple[dict[str, Method], dict[float, dict[str, Method]]]:
    """Methods at the full budget (table rows, in plan order) and, per budget fraction, the curve's methods."""
    full: dict[str, Method] = {}
    for name in ["base", "rag", "iter-retgen", "warm-start"]:
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


def write_report(data: dict, out_dir: Path, name: str, n_boot: int = 2000, plots: bool = True
                 ) -> tuple[dict[str, Path], tuple[list[str], list[list[Any]]]]:
    """Write `<out_dir>/<name>.md`, `<name>.json` and `<name>_{metrics,training_curves,budget_curve}.png`; returns
    the paths and the main table (columns, rows) for wandb. `plots=False` (the partial report rewritten after every
    run) keeps the last PNGs: drawing them took most of a report's time."""
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
    add(f"- train questions in each seed's pools: {data.get('train_questions')}; test questions scored: {len(qids)}")
    add(f"- primary comparison: {' vs '.join(cfg.get('primary') or [])} (main variants); every other test is "
        "secondary and Holm-corrected")
    add("- the warm start is built once and shared by every seed: seeds resample the pools and the data order, "
        "not the warm start, so its variance is not in the intervals")
    finished = (f" (finished so far: seeds {sorted({int(r['seed']) for r in data['runs']})})"
                if data.get("planned_runs") else "")
    add(f"- arms: {n_arms} variants, {n_runs} training runs; main-arm seeds {cfg['seeds']}{finished}, "
        f"ablation seeds {cfg['ablation_seeds']}, budget-curve seeds {cfg['curve_seeds']}")
    from rag_dpo.pipeline.compare import FAMILIES
    left_out = [f for f in FAMILIES if f not in cfg.get("arms", FAMILIES)]
    if left_out:
        add(f"- **not in this compare** (`arms=` leaves them out): {', '.join(left_out)}")
    add(f"- machine: {data.get('machine', '?')}; summed run wall time {data.get('wall_s_total', 0) / 60:.1f} min "
        f"(this invocation {data.get('wall_s_this_invocation', 0) / 60:.1f} min)")
    add("- intervals: 95 % bootstrap over test questions and seeds (two-level; "
        f"{n_boot} replicates); paired tests resample per-question differences.\n")

    # ---- every paired test: one primary, the rest secondary and Holm-corrected --------------------------------
    tol = float(cfg.get("budget_tolerance", PPO_BUDGET_SLACK))
    primary = list(cfg.get("primary") or ["step-dpo", "outcome-dpo"])
    pa, pb = _main(full, primary[0]), _main(full, primary[1])
    tests: list[dict] = []

    def add_test(label: str, a: Method, b: Method, metric: str, kind: str, is_primary: bool = False) -> dict | None:
        res = _paired(a, b, metric, qids, n_boot) if qids else None
        if res is None:
            return None
        mde = _mde(a, b, metric, qids)
        empty = [m.name for m in (a, b) if m.runs and all(r.get("no_data") for r in m.runs)]
        t = {"label": label, "a": a.name, "b": b.name, "metric": metric, "kind": kind, "primary": is_primary,
             **res, "p": res["p_value"], "mde": mde["mde"], "discordant_rate": mde["discordant_rate"],
             "questions": len(qids), "no_data": empty}
        tests.append(t)
        return t

    prim = None
    if pa and pb:
        prim = add_test(f"PRIMARY: {primary[0]} vs {primary[1]} (main variants)", pa, pb, "em", "pair", True)
        add_test(f"{primary[0]} vs {primary[1]} (main variants)", pa, pb, "f1", "pair")
        add_test(f"{primary[0]} vs {primary[1]} (main variants)", pa, pb, "recall", "pair")
    for w in cfg.get("nll_weights", []):
        s_, o_ = _main(full, "step-dpo", w), _main(full, "outcome-dpo", w)
        if s_ and o_ and not (s_ is pa and o_ is pb) and not (s_ is pb and o_ is pa):
            for metric in ("em", "f1"):
                add_test(f"step-DPO vs outcome-DPO (NLL weight {w:g})", s_, o_, metric, "pair")
    for fa, fb in (("step-dpo", "process-ppo"), ("outcome-dpo", "outcome-ppo"), ("step-dpo", "outcome-ppo"),
                   ("outcome-dpo", "process-ppo"), ("process-ppo", "outcome-ppo")):
        ma, mb = _main(full, fa), _main(full, fb)
        if ma and mb and {fa, fb} != set(primary):
            for metric in ("em", "f1"):
                add_test(f"{fa} vs {fb}", ma, mb, metric, "pair")
    vs_warm: dict[str, dict] = {}
    if warm is not None:
        for m in full.values():
            if m.kind == "arm":
                t = add_test(f"{m.name} vs warm start", m, warm, "em", "vs-warm-start")
                if t:
                    vs_warm[m.name] = t
        for m in full.values():       # step labels reward retrieval: does an arm find more supporting passages?
            if m.kind == "arm":
                add_test(f"{m.name} vs warm start", m, warm, "recall", "vs-warm-start")
    for frac in sorted(curve):
        if frac == 1.0:
            continue
        cs = next((m for m in curve[frac].values() if m.family == "step-dpo"), None)
        co = next((m for m in curve[frac].values() if m.family == "outcome-dpo"), None)
        if cs and co:
            add_test(f"budget curve {frac:g}: step-DPO vs outcome-DPO", cs, co, "em", "curve")
    secondary = [t for t in tests if not t["primary"]]
    for t, adj in zip(secondary, holm([t["p"] for t in secondary])):
        t["p_holm"] = adj
    if prim is not None:
        prim["p_holm"] = None

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
        res = vs_warm.get(m.name) if m.kind == "arm" else None
        if res is not None:
            cells.append(f"{res['diff']:+.3f} [{res['lo']:+.3f}, {res['hi']:+.3f}]")
            if res["diff"] < 0:
                sig = "significantly " if res["p_holm"] < 0.05 else ""
                note = f"⚠ {sig}below warm start (p={_fmt_p(res['p'])}, Holm {_fmt_p(res['p_holm'])})"
                below.append(f"{m.name} ({res['diff']:+.3f} EM{', significant after Holm' if sig else ''})")
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
    above = [t for t in vs_warm.values() if t["lo"] > 0]
    if above:
        verdict.extend(above_warm_start_verdict(above))
    elif vs_warm:
        best = max(vs_warm.values(), key=lambda t: t["lo"])
        gap = -best["lo"]
        miss = (f"its lower bound misses 0 by {gap:.3f}" if gap >= 0.0005 else
                f"its lower bound misses 0 by {gap:.1e}" if gap > 0 else "its interval touches 0")
        verdict.append(f"No arm is above the warm start with a 95 % interval excluding 0; the closest, {best['a']}, "
                       f"has ΔEM {best['diff']:+.3f} [{best['lo']:+.3f}, {best['hi']:+.3f}] ({miss}).")
    if below:
        verdict.append("Arms below the warm start they were trained from: " + ", ".join(below) + ".")
    elif warm is not None and n_arms:
        verdict.append("No arm scored below the warm start on EM.")
    if no_data:
        verdict.append("Arms the rollout pool gave no training data (no pairs / no right chains), so they are the "
                       "warm start unchanged and say nothing about their method: " + ", ".join(no_data) + ".")

    seen_lines, seen_verdict, seen_json = answer_seen_section(full, qids, warm, (pa, pb), n_boot)
    lines.extend(seen_lines)

    # ---- paired tests ---------------------------------------------------------------------------------------
    add("## Paired tests (A − B on the same questions and seeds)\n")
    add(f"The primary comparison is named in the compare config (`primary: {primary}`) and is tested at 5 % "
        "uncorrected; every other test here and in the table above is secondary, with its p Holm-corrected over "
        f"all {len(secondary)} secondary tests. MDE: the smallest true difference the test detects with 80 % "
        "power at 5 % (two-sided), from the observed discordance (McNemar; `eval.stats.min_detectable_effect`).\n")
    if tests:
        add("| comparison | A | B | metric | Δ [95 % CI] | p | Holm p | MDE (80 %) | discordant |")
        add("|---|---|---|---|---|---|---|---|---|")
        for t in tests:
            shown = t["label"] + (f" (⚠ no training data: {', '.join(t['no_data'])})" if t["no_data"] else "")
            holm_p = "primary" if t["primary"] else _fmt_p(t["p_holm"])
            mde = "n/a" if t["mde"] != t["mde"] else f"{t['mde']:.3f}"
            add(f"| {shown} | {t['a']} | {t['b']} | {t['metric'].upper()} | {t['diff']:+.3f} [{t['lo']:+.3f}, "
                f"{t['hi']:+.3f}] | {_fmt_p(t['p'])} | {holm_p} | {mde} | {t['discordant_rate']:.3f} |")
    else:
        add("Not enough arms finished for paired tests.")
    add("")
    if prim is None:
        verdict.insert(0, f"PRIMARY comparison {primary[0]} vs {primary[1]}: not run (both main arms are needed).")
    elif prim["no_data"]:
        verdict.insert(0, f"PRIMARY comparison {primary[0]} vs {primary[1]}: not a comparison — "
                          f"{' and '.join(prim['no_data'])} had no training data.")
    else:
        verdict.insert(0, "PRIMARY " + _sentence(prim["a"], prim["b"], f"{primary[0]} vs {primary[1]}", prim))
    for t in tests:
        if t["kind"] == "pair" and t["metric"] == "em" and not t["primary"] and not t["no_data"]:
            verdict.append("Secondary " + _sentence(t["a"], t["b"], t["label"], t, holm_p=t["p_holm"]))
    verdict.extend(recall_verdict([t for t in tests if t["metric"] == "recall" and not t["no_data"]]))

    # ---- budgets and training rows --------------------------------------------------------------------------
    from rag_dpo.pipeline.compare import read_health
    for run in data["runs"]:     # a run finished before done.json kept its health: its policy folder's, if there
        if run.get("health") is None and run.get("policy"):
            run["health"] = read_health(run["policy"])
    add("## Training data and budgets\n")
    add("Every arm of a seed is matched to what that seed's step pool spent on the same questions (generated tokens, "
        "the step annotator's own generation included); the outcome pool samples i.i.d. chains per question up to "
        "that spend, PPO rolls out up to it. Rollout counts differ by design (a tree-search chain holds k candidates "
        f"per step). The check allows {tol:.0%} on generated tokens and none on questions.\n")
    add("| arm | seed | fraction | pool | training rows | rows by action (chosen>rejected) | questions | rollouts | "
        "generated tokens | step-pool tokens (target) | Δ tokens |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    problems: list[str] = []
    rows_out: list[dict] = []
    for run in data["runs"]:
        b, t = run.get("budget") or {}, run.get("target_budget") or {}
        fam = run["arm"]["family"]
        pool = "own rollouts" if fam.endswith("ppo") else ("step" if fam == "step-dpo" else "outcome")
        if cfg.get("pools") == "shared" and not fam.endswith("ppo"):
            pool = "shared tree"
        gen, tgt = b.get("generated_tokens"), t.get("generated_tokens")
        delta = (float(gen) - float(tgt)) / max(float(tgt), 1e-12) if gen is not None and tgt is not None else None
        by_action = b.get("rows_by_action") or {}
        add(f"| {run['name']} | {run['seed']} | {run['fraction']:g} | {pool} | {b.get('rows', '?')} | "
            f"{', '.join(f'{k} {v}' for k, v in by_action.items()) or '—'} | {b.get('questions', '?')} | "
            f"{b.get('rollouts', '?')} | {_num(gen)} | {_num(tgt)} | "
            f"{'?' if delta is None else f'{delta:+.1%}'} |")
        who = f"{run['name']} s{run['seed']} q{run['fraction']:g}"
        problems += [f"{who}: {p}" for p in budget_mismatches({"step pool": t, run["name"]: b}, keys=("questions",))]
        problems += [f"{who}: {p}" for p in budget_mismatches({"step pool": t, run["name"]: b},
                                                              keys=("generated_tokens",), rel_tol=tol)]
        rows_out.append({"arm": run["name"], "family": fam, "seed": run["seed"], "fraction": run["fraction"],
                         "pool": pool, "rows": b.get("rows"), "rows_by_action": by_action,
                         "questions": b.get("questions"), "rollouts": b.get("rollouts"), "generated_tokens": gen,
                         "target_generated_tokens": tgt, "no_data": run.get("no_data", ""),
                         "health": run.get("health")})
    add("")
    if problems:
        add("**Budgets do not match**:\n")
        add("\n".join(f"- {p}" for p in problems))
        verdict.append("Budgets were NOT matched (see the budgets section); treat comparisons with care.")
    elif data["runs"]:
        add(f"Budgets match: every arm's data cost the same questions and generated tokens within {tol:.0%} of its "
            "seed's step pool.")
        verdict.append(f"Budgets matched across arms (generated tokens within {tol:.0%}).")
    add("")

    # ---- training health ------------------------------------------------------------------------------------
    add("## Training health (from each run's training log)\n")
    add("Preference fit (DPO): reward accuracy and margin (TRL's, beta x the log-ratio gap between chosen and "
        "rejected) averaged over the last quarter of the logs; an arm that ends near accuracy 0.5 and margin 0 has "
        "barely moved from its warm start, so its \"no difference\" says little about its method. Chosen / rejected "
        "vs reference: beta-scaled log-prob change over the same logs (both below 0: likelihood displacement). "
        "Flags: `train.common.health`.\n")
    add("| arm | seed | fraction | optimizer steps | reward accuracy | reward margin | chosen / rejected vs reference "
        "| KL first / max / last | collapse signs |")
    add("|---|---|---|---|---|---|---|---|---|")
    flagged: list[str] = []
    for run in data["runs"]:
        if run.get("no_data"):
            continue
        h = run.get("health")
        cells = [run["name"], str(run["seed"]), f"{run['fraction']:g}"]
        if not h:
            add("| " + " | ".join(cells + ["—"] * 5 + ["not recorded"]) + " |")
            continue
        kl = h.get("kl")
        ref = ((h.get("chosen_vs_reference"), h.get("rejected_vs_reference"))
               if "chosen_vs_reference" in h else None)
        cells += [str(h.get("global_step", "?")), _num3(h.get("reward_accuracy")), _num3(h.get("reward_margin"), "+"),
                  f"{ref[0]:+.3f} / {ref[1]:+.3f}" if ref else "—",
                  " / ".join(f"{x:.3f}" for x in kl) if kl else "—",
                  "; ".join(h.get("flags") or []) or "none"]
        add("| " + " | ".join(cells) + " |")
        flagged += [f"{run['name']} s{run['seed']}: {f}" for f in h.get("flags") or []]
    add("")
    if flagged:
        verdict.append("Collapse signs in training logs: " + "; ".join(flagged) + ".")
    elif any(r.get("health") for r in data["runs"]):
        verdict.append("No collapse sign (likelihood displacement, KL spike, entropy collapse) in any run's "
                       "training log.")

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
    if plots:
        _plot_metrics(full, qids, n_boot, paths["metrics"],
                      seen_qids=None if seen_json.get("not_recorded") else seen_json.get("question_ids"))
        _plot_training_curves(data["runs"], paths["training_curves"])
        _plot_budget_curve(curve_rows, paths["budget_curve"])
    add("## Plots\n")
    add(f"![metrics by method]({paths['metrics'].name})\n")
    add(f"![training curves]({paths['training_curves'].name})\n")
    add(f"![budget curve]({paths['budget_curve'].name})\n")

    paths["json"] = out_dir / f"{name}.json"
    seen_json.pop("question_ids", None)
    atomic_write_json(paths["json"], {**results_json(data, name, full, qids, tests, rows_out, problems, n_boot),
                                      "answer_seen": seen_json})

    verdict.extend(seen_verdict)      # last: a diagnostic, never a finding
    head = lines[:lines.index("## What was run\n")]
    body = lines[len(head):]
    text = "\n".join(head + ["## Verdict (generated from the numbers below)\n"] + [f"- {v}" for v in verdict]
                     + [""] + body) + "\n"
    atomic_write_text(paths["report"], text)
    return paths, (columns, table)


def answer_seen_section(full: dict[str, Method], qids: list[str], warm: Method | None,
                        primary: tuple[Method | None, Method | None], n_boot: int
                        ) -> tuple[list[str], list[str], dict[str, Any]]:
    """Did retrieval put the answer in front of the reader? Per method, the share of questions whose gold answer
    was in the passages it read (`answer_seen`, over the questions with a non-yes/no gold) and its EM on those;
    each arm and the primary pair as paired differences. Descriptive, so intervals only: no p-values, outside the
    Holm family, never a verdict. A support-recall gain that leaves `answer_seen` flat cannot move EM; one that
    raises it while EM stays flat points at the reader. Returns the report lines, one verdict line, the JSON."""
    have = [m for m in full.values() if m.recorded("answer_seen", qids)]
    missing = [m.name for m in full.values() if m not in have]
    stated = [q for q in qids if all(rows[q]["answer_seen"] is not None for m in have for rows in m.by_seed.values())]
    lines = ["## Did the answer reach the reader? (diagnostic, not a test)\n"]
    if not have or not stated:
        lines.append("Not recorded: these runs were scored before `answer_seen` existed and their evaluated chains "
                     "are gone.\n")
        return lines, [], {"recorded": False}
    lines.append(f"Answer seen: share of the {len(stated)} test questions with a non-yes/no gold answer whose answer "
                 "is in the passages the agent read, as cut to the passage budget; EM when seen: EM on those cells "
                 "(question x seed). Descriptive: 95 % intervals, no p-values, outside the Holm family of the "
                 "paired tests.\n")
    lines.append("| method | answer seen [95 % CI] | EM when seen | Δ answer seen vs warm start [95 % CI] |")
    lines.append("|---|---|---|---|")
    out: dict[str, Any] = {"recorded": True, "questions": len(stated), "question_ids": stated, "methods": {},
                           "not_recorded": missing}
    deltas = []
    for m in have:
        seen = m.matrix("answer_seen", stated)
        mean, lo, hi = bootstrap_ci(seen, n_boot=n_boot, seed=0)
        hit = seen > 0
        when = float(m.matrix("em", stated)[hit].mean()) if hit.any() else None
        entry: dict[str, Any] = {"mean": mean, "lo": lo, "hi": hi, "per_seed": seed_means(seen), "em_when_seen": when}
        cell = "—"
        if m.kind == "arm" and warm in have:
            res = _paired(m, warm, "answer_seen", stated, n_boot)
            entry["delta_vs_warm_start"] = {k: res[k] for k in ("diff", "lo", "hi")}
            cell = f"{res['diff']:+.3f} [{res['lo']:+.3f}, {res['hi']:+.3f}]"
            deltas.append(f"{m.name} {cell}")
        out["methods"][m.name] = entry
        lines.append(f"| {m.name} | {_fmt(mean, lo, hi, 'answer_seen')} | {_num3(when)} | {cell} |")
    lines.append("")
    pa, pb = primary
    said = []
    if pa in have and pb in have:
        res = _paired(pa, pb, "answer_seen", stated, n_boot)
        out["primary"] = {"a": pa.name, "b": pb.name, **{k: res[k] for k in ("diff", "lo", "hi")}}
        span = f"{res['diff']:+.3f} [{res['lo']:+.3f}, {res['hi']:+.3f}]"
        lines.append(f"Primary pair, answer seen: {pa.name} − {pb.name} {span}.\n")
        said.append(f"{pa.name} − {pb.name} {span}")
    if deltas:
        said.append("vs warm start: " + ", ".join(deltas))
    if missing:
        lines.append(f"Not recorded for: {', '.join(missing)} (scored before `answer_seen` existed).\n")
    verdict = [f"Diagnostic, not a test — answer seen: {'; '.join(said)}."] if said else []
    return lines, verdict, out


def above_warm_start_verdict(above: list[dict]) -> list[str]:
    """Verdict lines for the arms whose ΔEM interval against the warm start excludes 0. The interval is per test;
    the secondary tests as a family are what Holm controls, so an arm whose Holm p is not below 0.05 is named as a
    lead, not a finding."""
    lines = ["Arms above the warm start (95 % interval of ΔEM excludes 0): " + ", ".join(
        f"{t['a']} ({t['diff']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}], Holm p={_fmt_p(t['p_holm'])})"
        for t in above) + "."]
    weak = [t["a"] for t in above if t["p_holm"] >= 0.05]
    if weak:
        lines.append(f"Of these, {', '.join(weak)} {'is' if len(weak) == 1 else 'are'} not significant after the "
                     "Holm correction over the secondary tests (Holm p ≥ 0.05): a lead, not a finding.")
    return lines


def recall_verdict(tests: list[dict]) -> list[str]:
    """One line for the support-recall tests that are significant after Holm (secondary tests: a difference in
    what the agent retrieves is not a difference in answers, so it never speaks for the primary question)."""
    hits = [t for t in tests if t.get("p_holm") is not None and t["p_holm"] < 0.05]
    if not hits:
        return []
    return ["Secondary, support recall (significant after Holm): " + "; ".join(
        f"{t['a']} {'above' if t['diff'] > 0 else 'below'} {t['b']} ({t['diff']:+.3f} [{t['lo']:+.3f}, "
        f"{t['hi']:+.3f}], Holm p={_fmt_p(t['p_holm'])})" for t in hits) + "."]


def _sentence(a: str, b: str, label: str, res: dict, holm_p: float | None = None) -> str:
    """One verdict sentence. A secondary test (`holm_p` given) is called significant only after Holm correction;
    a null result says what the test could have detected (its MDE)."""
    span = f"ΔEM {res['diff']:+.3f} [{res['lo']:+.3f}, {res['hi']:+.3f}], p={_fmt_p(res['p_value'])}"
    if holm_p is not None:
        span += f", Holm p={_fmt_p(holm_p)}"
    mde = res.get("mde")
    could = (f"; it could have detected |ΔEM| ≥ {mde:.3f} with 80 % power" if mde is not None and mde == mde
             else "; no discordant questions, so no power estimate")
    significant = (holm_p < 0.05) if holm_p is not None else (res["lo"] > 0 or res["hi"] < 0)
    if significant and res["diff"] > 0:
        return f"{label}: {a} beat {b} ({span})."
    if significant and res["diff"] < 0:
        return f"{label}: {a} did NOT beat {b}; it was worse ({span})."
    return f"{label}: no significant difference — {a} did not demonstrably beat {b} ({span}{could})."


def _num3(x, sign: str = "") -> str:
    return "—" if x is None else f"{x:{sign}.3f}"


def _num(x) -> str:
    return "?" if x is None else f"{float(x):g}"


def _mde(a: "Method", b: "Method", metric: str, qids: list[str]) -> dict:
    if a.kind == "baseline" or b.kind == "baseline":
        return min_detectable_effect(a.matrix(metric, qids), b.matrix(metric, qids))
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    return min_detectable_effect(a.matrix(metric, qids, seeds), b.matrix(metric, qids, seeds))


def results_json(data: dict, name: str, full: dict, qids: list[str], tests: list[dict], rows: list[dict],
                 problems: list[str], n_boot: int) -> dict:
    """`results/<name>.json`: the report's numbers for people who plot or compare runs."""
    methods = {}
    warm_em = {t["a"]: t for t in tests if t["kind"] == "vs-warm-start"}
    for m in full.values():
        entry: dict[str, Any] = {"kind": m.kind, "family": m.family, "main": m.main, "seeds": sorted(m.by_seed),
                                 "metrics": {}}
        for metric in METRICS:
            if not qids:
                continue
            mat = m.matrix(metric, qids)
            mean, lo, hi = bootstrap_ci(mat, n_boot=n_boot, seed=0)
            entry["metrics"][metric] = {"mean": mean, "lo": lo, "hi": hi, "per_seed": seed_means(mat)}
        t = warm_em.get(m.name)
        if t:
            entry["delta_em_vs_warm_start"] = {k: t[k] for k in ("diff", "lo", "hi", "p", "p_holm", "mde",
                                                                 "discordant_rate")}
        methods[m.name] = entry
    cfg = data["config"]
    return {"name": name, "quick": bool(cfg.get("quick")), "partial_of_planned_runs": data.get("planned_runs"),
            "test_questions": len(qids), "seeds": cfg.get("seeds"), "pools": cfg.get("pools", "separate"),
            "primary": cfg.get("primary"), "warm_start_shared_by_all_seeds": True,
            "setup": data.get("setup") or {}, "machine": data.get("machine"), "methods": methods,
            "tests": [{k: v for k, v in t.items() if k != "p_value"} for t in tests],
            "training_rows": rows, "budget_check": {"ok": not problems, "problems": problems,
                                                    "tolerance": cfg.get("budget_tolerance")},
            "wall_s_total": data.get("wall_s_total")}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_metrics(full: dict[str, Method], qids: list[str], n_boot: int, path: Path,
                  seen_qids: list[str] | None = None) -> None:
    """EM, F1, support recall, and answer seen on `seen_qids` (given when every method recorded it)."""
    plt = _plt()
    names = list(full)
    panels = [("em", qids), ("f1", qids), ("recall", qids)] + ([("answer_seen", seen_qids)] if seen_qids else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 0.45 * max(len(names), 4) + 1.5),
                             sharey=True)
    for ax, (metric, on) in zip(axes, panels):
        stats = [bootstrap_ci(full[n].matrix(metric, on), n_boot=n_boot, seed=0) if on else (0, 0, 0)
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
