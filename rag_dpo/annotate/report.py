"""Annotator report: label balance per annotator and agreement (Cohen's kappa) between annotators on the same
steps, as a markdown table, a PNG and a wandb chart (`rag-dpo annotate-report`).

Steps are matched across files by (question id, index of the chain among that question's chains, step id), and
a match also needs the same step text, so files annotated from the same chains file line up and anything else
is not compared. The first label seen for an (annotator, step) wins.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Sequence

from rag_dpo.records import Label, read_chains


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two binary labelings of the same items; nan when chance agreement is 1 (undefined)."""
    if len(a) != len(b):
        raise ValueError("labelings differ in length")
    n = len(a)
    if n == 0:
        return math.nan
    po = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return math.nan if pe >= 1.0 else (po - pe) / (1 - pe)


def collect_labels(paths: Sequence[str | Path]) -> dict[tuple, dict[str, tuple[str, Label]]]:
    """(question id, chain index, step id) -> annotator -> (step action, label)."""
    table: dict[tuple, dict[str, tuple[str, Label]]] = {}
    texts: dict[tuple, str] = {}
    for path in paths:
        seen: dict[str, int] = {}
        for chain in read_chains(path):
            idx = seen.get(chain.question_id, 0)
            seen[chain.question_id] = idx + 1
            for s in chain.steps:
                key = (chain.question_id, idx, s.id)
                if texts.setdefault(key, s.text) != s.text:
                    continue
                row = table.setdefault(key, {})
                for name, label in s.labels.items():
                    row.setdefault(name, (s.action, label))
    return table


def annotate_report(paths: Sequence[str | Path], out_dir: str | Path | None = None, wandb: bool = True) -> dict:
    """Balance and agreement tables; writes report.md, report.json and report.png into out_dir when given."""
    table = collect_labels(paths)
    names = sorted({n for row in table.values() for n in row})
    balance = []
    for n in names:
        labs = [row[n] for row in table.values() if n in row]
        by_action = {}
        for act in ("search", "answer", "invalid"):
            sub = [lab.good for a, lab in labs if a == act]
            by_action[act] = sum(sub) / len(sub) if sub else None
        balance.append({"annotator": n, "steps": len(labs), "good": sum(lab.good for _, lab in labs) / len(labs),
                        "mean_value": sum(lab.value for _, lab in labs) / len(labs),
                        "good_search": by_action["search"], "good_answer": by_action["answer"]})
    agreement = []
    for x, y in combinations(names, 2):
        shared = [(row[x][1].good, row[y][1].good) for row in table.values() if x in row and y in row]
        a, b = [p[0] for p in shared], [p[1] for p in shared]
        agreement.append({"a": x, "b": y, "steps": len(shared),
                          "agreement": sum(p == q for p, q in shared) / len(shared) if shared else None,
                          "kappa": cohen_kappa(a, b) if shared else math.nan})
    report = {"files": [str(p) for p in paths], "balance": balance, "agreement": agreement,
              "markdown": to_markdown(balance, agreement)}
    if out_dir is not None:
        from rag_dpo.io import atomic_write_json, atomic_write_text
        out = Path(out_dir)
        atomic_write_text(out / "report.md", report["markdown"])
        atomic_write_json(out / "report.json", {k: v for k, v in report.items() if k != "markdown"})
        report["png"] = str(plot_report(balance, agreement, names, out / "report.png"))
        if wandb:
            log_wandb(report, out)
    return report


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def to_markdown(balance: list[dict], agreement: list[dict]) -> str:
    lines = ["## Label balance", "", "| annotator | steps | good | mean value | good (search) | good (answer) |",
             "|---|---|---|---|---|---|"]
    for b in balance:
        lines.append(f"| {b['annotator']} | {b['steps']} | {_fmt(b['good'])} | {_fmt(b['mean_value'])} | "
                     f"{_fmt(b['good_search'])} | {_fmt(b['good_answer'])} |")
    lines += ["", "## Agreement on shared steps", "", "| annotator A | annotator B | shared steps | agreement | "
              "Cohen's kappa |", "|---|---|---|---|---|"]
    for a in agreement:
        lines.append(f"| {a['a']} | {a['b']} | {a['steps']} | {_fmt(a['agreement'])} | {_fmt(a['kappa'])} |")
    if not agreement:
        lines.append("| (one annotator only) | | | | |")
    return "\n".join(lines) + "\n"


def plot_report(balance: list[dict], agreement: list[dict], names: list[str], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar([b["annotator"] for b in balance], [b["good"] for b in balance], color="tab:green")
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("share of steps labelled good")
    ax1.set_title("Label balance")
    idx = {n: i for i, n in enumerate(names)}
    m = np.full((len(names), len(names)), np.nan)
    for i in range(len(names)):
        m[i, i] = 1.0
    for a in agreement:
        m[idx[a["a"]], idx[a["b"]]] = m[idx[a["b"]], idx[a["a"]]] = a["kappa"]
    im = ax2.imshow(m, vmin=-1, vmax=1, cmap="RdBu")
    ax2.set_xticks(range(len(names)), names, rotation=45)
    ax2.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax2.text(j, i, _fmt(float(m[i, j])), ha="center", va="center", fontsize=8)
    ax2.set_title("Cohen's kappa")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_wandb(report: dict, out: Path) -> None:
    from rag_dpo import tracking
    run = tracking.init_run("annotate-report", config={"files": report["files"]}, job_type="annotate-report",
                            dir=out)
    if run is None:
        return
    tracking.log_table(run, "label_balance", ["annotator", "steps", "good", "mean_value"],
                       [[b["annotator"], b["steps"], b["good"], b["mean_value"]] for b in report["balance"]])
    tracking.log_table(run, "agreement", ["a", "b", "steps", "agreement", "kappa"],
                       [[a["a"], a["b"], a["steps"], a["agreement"], a["kappa"]] for a in report["agreement"]])
    try:
        import wandb
        t = wandb.Table(columns=["annotator", "good"], data=[[b["annotator"], b["good"]] for b in report["balance"]])
        run.log({"label_balance_chart": wandb.plot.bar(t, "annotator", "good", title="Share of good labels")})
    except Exception as e:  # tracking is best effort
        print(f"[rag_dpo] wandb chart failed: {e}")
    tracking.log_image(run, "annotate_report", out / "report.png")
    tracking.finish(run)
