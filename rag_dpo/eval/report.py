"""Eval output a person looks at: the results table (markdown, with deltas against another policy's results) and
a bar plot of the metrics per method (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

RATE_METRICS = ("em", "f1", "cover_em", "support_recall", "answer_seen", "parse_error_rate")
COLUMNS = ("em", "f1", "cover_em", "support_recall", "answer_seen", "steps", "parse_error_rate", "n", "seconds")


def _fmt(key: str, value) -> str:
    if key == "n":
        return str(int(value))
    if key == "seconds":
        return f"{value:.1f}"
    if key == "steps":
        return f"{value:.2f}"
    return f"{value:.3f}"


def results_table(results: dict[str, dict], baseline: dict[str, dict] | None = None,
                  baseline_name: str = "baseline") -> str:
    """Markdown table method x metrics; with `baseline` (another policy's results.json) a row of deltas
    (this - baseline) under each method the baseline also has."""
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method, r in results.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(k, r.get(k, 0.0)) for k in COLUMNS) + " |")
        b = (baseline or {}).get(method)
        if b:
            deltas = [f"{r[k] - b[k]:+.3f}" if k in RATE_METRICS and k in b else "" for k in COLUMNS]
            lines.append(f"| Δ vs {baseline_name} | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def plot_results(results: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per metric (rates in [0, 1]), one bar per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    methods = list(results)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.6 * len(RATE_METRICS) + 2, 3.6))
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(RATE_METRICS))]
        ax.bar(xs, [results[m].get(k, 0.0) for k in RATE_METRICS], width, label=m)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(RATE_METRICS))], RATE_METRICS)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score / rate")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=min(len(methods), 5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
