"""`rag-dpo dashboard`: a saved wandb workspace for the comparison and the recipe runs, built with
`wandb-workspaces` (the optional extra `rag_dpo[dashboard]`).

What it shows (section by section, see PANELS): EM / F1 / supporting-passage recall by arm with the warm start's
score on the same questions next to each arm (compare logs `eval/warm_start/<metric>` into every arm's run; wandb
bar plots have no reference line), the compare report's figures and table; training loss and chosen / rejected
log-probs per arm (TRL's DPO metrics as the HF wandb callback names them, `train/...`); PPO reward, outcome and KL
(`ppo/...`); the recipe runs' trained vs warm-start scores (`eval/<policy>/agent/<metric>`); the chains tables.

Design decisions:
- The panels are plain data (PANELS: section -> panels -> metric names) turned into wandb_workspaces objects in
  one function, so a test can check every name against what the trainers, eval and compare really log
  (`expected_metrics`), and the layout reads in one place.
- Offline first, like `rag_dpo.tracking`: with WANDB_MODE=offline (the default here) or no wandb login the
  workspace is written as JSON (the wandb view spec wandb-workspaces would upload) and the command prints how to
  apply it after `wandb sync`; `--save` uploads it (needs a login and the synced runs).
- Runs are grouped by the config key `name` (compare: the arm or baseline name; seeds aggregate into mean and
  standard error) and can be restricted to one wandb group (`--group`, a compare's name or a recipe's group).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rag_dpo.errors import InputError

COMPARE_METRICS = ("em", "f1", "recall")            # pipeline.compare.METRICS that get a bar chart each
LABELS = {"em": "EM", "f1": "F1", "recall": "supporting-passage recall"}


@dataclass
class Panel:
    kind: str                      # bar | line | media | table
    title: str
    metrics: list[str] = field(default_factory=list)   # bar/line: y metrics; media: image keys; table: table key
    x: str | None = None           # line: x-axis metric
    source: str = ""               # which code logs these names (the test checks each against it)
    titles: dict[str, str] = field(default_factory=dict)


def _bars() -> list[Panel]:
    return [Panel("bar", f"{LABELS[m]} by arm (warm start on the same questions alongside)",
                  [f"eval/{m}", f"eval/warm_start/{m}"], source="compare",
                  titles={f"eval/{m}": LABELS[m], f"eval/warm_start/{m}": "warm start"}) for m in COMPARE_METRICS]


PANELS: dict[str, list[Panel]] = {
    "Comparison: scores by arm": _bars() + [
        Panel("bar", "steps and parse errors by arm", ["eval/steps", "eval/parse_error"], source="compare"),
        Panel("media", "compare report figures", ["compare/metrics", "compare/training_curves",
                                                  "compare/budget_curve"], source="compare-summary"),
        Panel("table", "compare results table", ["compare/results"], source="compare-summary"),
    ],
    "Training curves per arm": [
        Panel("line", "training loss", ["train/loss"], x="train/global_step", source="hf-trainer"),
        Panel("line", "DPO: chosen and rejected log-probs", ["train/logps/chosen", "train/logps/rejected"],
              x="train/global_step", source="dpo"),
        Panel("line", "DPO: reward margin and accuracy", ["train/rewards/margins", "train/rewards/accuracies"],
              x="train/global_step", source="dpo"),
    ],
    "PPO": [
        Panel("line", "PPO reward and outcome", ["ppo/reward", "ppo/outcome"], x="ppo/step", source="ppo"),
        Panel("line", "PPO KL to the reference", ["ppo/kl"], x="ppo/step", source="ppo"),
    ],
    "Recipe runs: trained vs warm start": [
        Panel("bar", f"{LABELS.get(m, m)}: trained vs warm start (agent)",
              [f"eval/trained/agent/{m}", f"eval/warm_start/agent/{m}"], source="pipeline")
        for m in ("em", "f1", "support_recall")
    ] + [Panel("table", "results by policy", ["eval/results"], source="pipeline")],
    "Chains": [
        Panel("table", "scored chains (recipe and compare runs)", ["eval/chains"], source="pipeline"),
        Panel("table", "scored chains (rag-dpo eval)", ["chains"], source="eval"),
    ],
}


def expected_metrics() -> dict[str, set[str]]:
    """source -> every metric / table / image name the dashboard reads from it."""
    out: dict[str, set[str]] = {}
    for panels in PANELS.values():
        for p in panels:
            out.setdefault(p.source, set()).update(p.metrics)
            if p.x and p.source:
                out[p.source].add(p.x)
    return out


def _wandb_workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise InputError("the dashboard needs wandb-workspaces: pip install 'rag_dpo[dashboard]' "
                         "(or pip install wandb-workspaces)", field="dashboard") from None
    return ws, wr


def build_workspace(project: str, entity: str, name: str = "rag_dpo comparison", group: str | None = None):
    """The wandb_workspaces.Workspace of PANELS for `entity/project` (runs of wandb group `group` only if given)."""
    ws, wr = _wandb_workspaces()
    sections = []
    for title, panels in PANELS.items():
        objs = []
        for p in panels:
            if p.kind == "bar":
                objs.append(wr.BarPlot(title=p.title, metrics=list(p.metrics), groupby=wr.Config("name"),
                                       groupby_aggfunc="mean", groupby_rangefunc="stderr", orientation="v",
                                       line_titles=dict(p.titles) or None))
            elif p.kind == "line":
                objs.append(wr.LinePlot(title=p.title, x=p.x or "Step", y=list(p.metrics),
                                        groupby=wr.Config("name"), groupby_aggfunc="mean",
                                        groupby_rangefunc="stderr"))
            elif p.kind == "media":
                objs.append(wr.MediaBrowser(media_keys=list(p.metrics)))
            else:
                objs.append(wr.WeavePanelSummaryTable(table_name=p.metrics[0]))
        sections.append(ws.Section(name=title, panels=objs, is_open=True))
    runset = ws.RunsetSettings(filters=f"Group = '{group}'") if group else ws.RunsetSettings()
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections, runset_settings=runset)


def workspace_spec(workspace) -> dict:
    """The wandb view spec of a workspace (what `Workspace.save` uploads), as plain JSON."""
    model = workspace._to_model()
    return json.loads(model.model_dump_json(by_alias=True, exclude_none=True))


def _online() -> bool:
    if os.environ.get("WANDB_MODE", "offline") in ("offline", "disabled", "dryrun"):
        return False
    try:
        import wandb
        return bool(wandb.Api().api_key)
    except Exception:
        return False


def dashboard(project: str, entity: str | None = None, out: str | Path | None = None, save: bool = False,
              group: str | None = None, name: str = "rag_dpo comparison") -> dict:
    """Build the workspace; write its spec to `out` (default runs/dashboard/<project>.json). With `save` (online,
    logged in) also upload it and return its URL. Returns {"spec": path, "url": url or None, "panels": n}."""
    if save and not entity:
        raise InputError("saving a workspace needs --entity (your wandb user or team)", field="entity")
    workspace = build_workspace(project, entity or "YOUR_ENTITY", name=name, group=group)
    spec = workspace_spec(workspace)
    path = Path(out) if out else Path("runs") / "dashboard" / f"{project}.json"
    from rag_dpo.io import atomic_write_json
    atomic_write_json(path, {"format": "wandb-workspaces view spec", "entity": entity, "project": project,
                             "group": group, "name": name,
                             "panels": {s: [p.title for p in ps] for s, ps in PANELS.items()}, "spec": spec})
    url = None
    if save:
        if not _online():
            raise InputError("cannot save the workspace offline: set WANDB_MODE=online and run `wandb login`",
                             field="save")
        try:
            url = workspace.save().url
        except Exception as e:
            raise InputError(f"wandb refused the workspace: {str(e).splitlines()[0] if str(e) else e!r}",
                             field="save") from None
    return {"spec": str(path), "url": url, "panels": sum(len(p) for p in PANELS.values())}


def apply_instructions(project: str, entity: str | None, spec: str, group: str | None = None) -> str:
    """What to run to see the dashboard once the offline runs are uploaded."""
    ent = entity or "<your wandb user or team>"
    grp = f" --group {group}" if group else ""
    return (f"wrote the workspace spec: {spec}\n"
            "to apply it (runs are logged offline by default):\n"
            f"  1. wandb login && wandb sync --project {project} --entity {ent} "
            "$(find runs -type d -name 'offline-run-*')\n"
            f"  2. WANDB_MODE=online rag-dpo dashboard --project {project} --entity {ent}{grp} --save\n"
            "     (prints the workspace URL)")
