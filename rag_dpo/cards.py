"""Model and dataset cards (`README.md` with the Hugging Face hub's YAML metadata) for every trained policy folder
and every pair / SFT dataset folder, written with `huggingface_hub`'s card classes so `rag-dpo push` uploads a
folder the hub renders and indexes (base model, datasets, tags, license, model-index with the eval metrics).

Design decisions:
- A card is *derived*, never a source of truth: it is rebuilt from the JSON files the stages already write
  (`train_done.json`, `training_manifest.json`, `adapter_config.json`, `warm_start.json`, `budget.json`,
  `config.json`, `question_ids.json`) plus, when a pipeline run has them, its `recipe.yaml`, `data_hashes.json`,
  `results.json` / `results.md`. So any writer can call `write_model_card(folder)` at any time (the trainers do
  when they finish, the pipeline again after evaluation) and the latest call holds everything known by then.
- This is a shared helper like `io` or `tracking`: it imports no stage (pairs and train call it), and reads the
  other stages' files by name only.
- Hub metadata must validate on the hub: `base_model` is only set to a hub id (the bundled policy is
  HuggingFaceTB/SmolLM2-135M-Instruct, dequantised from its Q4_1 GGUF); a local base folder is named in the text
  instead. Likewise `datasets` lists only hub dataset ids we know the local file comes from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_NAMES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "bundled"}   # agent.policy.BUNDLED
# local data files -> the hub dataset they are a sample of (matched on the file path, lower case)
KNOWN_DATASETS = {"hotpotqa": ("hotpotqa/hotpot_qa", "cc-by-sa-4.0")}
EVAL_METRICS = (("em", "exact_match", "EM"), ("f1", "f1", "F1"), ("support_recall", "recall", "support recall"))
TABLE_METRICS = ("em", "f1", "support_recall", "parse_error_rate", "steps", "n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        import yaml
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ImportError):
        return None
    except Exception:   # yaml.YAMLError: a broken recipe copy must not stop a card
        return None


def base_lineage(folder: str | Path, _depth: int = 0) -> list[str]:
    """The chain of starting points of a trained folder, nearest first, ending at the root spec: e.g.
    [<warm start folder>, "smollm2"] for a DPO adapter continued from a full fine-tune warm start."""
    folder = Path(folder)
    if _depth > 8:
        return []
    nxt = None
    adapter = _read_json(folder / "adapter_config.json")
    if isinstance(adapter, dict) and adapter.get("base_model_name_or_path"):
        nxt = str(adapter["base_model_name_or_path"])
    if nxt is None:
        ws = _read_json(folder / "warm_start.json")
        if isinstance(ws, dict) and ws.get("model"):
            nxt = str(ws["model"])
    if nxt is None:
        return []
    p = Path(nxt)
    return [nxt] + (base_lineage(p, _depth + 1) if p.is_dir() else [])


def hub_base_model(lineage: list[str]) -> str | None:
    """The hub id of the root of the lineage, or None when it is a local folder we cannot name on the hub."""
    if not lineage:
        return None
    root = lineage[-1]
    if root.lower() in BUNDLED_NAMES:
        return BUNDLED_HUB_ID
    if not Path(root).exists() and root.count("/") == 1 and not root.startswith((".", "/", "~")):
        return root                 # looks like a hub id (namespace/name) and is no local folder
    return None


def known_dataset(paths: list[str]) -> tuple[str, str] | None:
    """(hub dataset id, its license) of the first data file that is a sample of a known hub dataset."""
    for p in paths:
        low = str(p).lower()
        for key, value in KNOWN_DATASETS.items():
            if key in low:
                return value
    return None


def _run_context(run_dir: Path | None) -> dict:
    if run_dir is None:
        return {}
    run_dir = Path(run_dir)
    results_md = run_dir / "results.md"
    return {"recipe": _read_yaml(run_dir / "recipe.yaml"), "data_hashes": _read_json(run_dir / "data_hashes.json"),
            "results": _read_json(run_dir / "results.json"),
            "results_md": results_md.read_text(encoding="utf-8") if results_md.exists() else None,
            "run_dir": str(run_dir)}


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if not x.is_integer() or abs(x) < 1 else str(int(x))   # counts as counts, rates as rates
    return "" if x is None else str(x)


def eval_table_markdown(results: dict, highlight: str | None = None) -> str:
    """policy x method rows of the metrics in TABLE_METRICS; `highlight` (this model's name) in bold."""
    keys = [k for k in TABLE_METRICS if any(k in m for t in results.values() for m in t.values())]
    lines = ["| policy | method | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, by_method in results.items():
        shown = f"**{name}** (this model)" if name == highlight else name
        for method, metrics in by_method.items():
            lines.append(f"| {shown} | {method} | " + " | ".join(_fmt(metrics.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _verdict(results_md: str | None) -> str:
    """The paired / unpaired statement under the table in a run's results.md (its non-table, non-title text)."""
    if not results_md:
        return ""
    keep = [ln for ln in results_md.splitlines() if ln.strip() and not ln.startswith(("#", "|"))]
    return "\n\n".join(keep)


def _eval_results(results: dict, name: str, dataset_id: str, dataset_name: str, split: str | None) -> list:
    from huggingface_hub import EvalResult
    out = []
    for method, metrics in (results.get(name) or {}).items():
        for key, metric_type, label in EVAL_METRICS:
            v = metrics.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(EvalResult(task_type="question-answering", task_name=f"multi-hop QA ({method})",
                                      dataset_type=dataset_id, dataset_name=dataset_name, dataset_split=split,
                                      metric_type=metric_type, metric_name=f"{label} ({method})",
                                      metric_value=round(float(v), 4)))
    return out


INTENDED_USE = """\
Research on supervising retrieval agents step by step: comparing process (step-level) and outcome supervision for
DPO / PPO on multi-hop question answering, reproducing and extending the runs of the rag_dpo toolkit. The policy
answers through the toolkit's tag protocol (`<search>` / `<answer>` steps with retrieved `<information>` blocks
in between), so it only works inside that loop (`rag_dpo.agent`, same system prompt, a retriever over a corpus).

**Limits.** A small model (135M parameters in the bundled setting) trained on a few hundred English multi-hop
Wikipedia questions: its answers are often wrong and must not be used as facts. Scores are on a small held-out
split, so their intervals are wide (see the paired test above when there is one); they do not transfer to other
corpora, retrievers or question types without re-evaluation. Evaluate it in float32: bf16 rounding erases most
of a short fine-tune's change. The evaluation refuses questions listed in `training_manifest.json`."""


def model_card(folder: str | Path, run_dir: str | Path | None = None, name: str | None = None,
               recipe: dict | None = None, merged: bool = False, method: str | None = None):
    """The huggingface_hub ModelCard of a trained policy folder (see the module doc for what it reads).
    `name` is this policy's row in the run's results.json (`trained`, `warm_start`); `merged`: the card of the
    merged full model `rag-dpo push --merged` uploads instead of the adapter."""
    from huggingface_hub import ModelCard, ModelCardData
    folder = Path(folder)
    ctx = _run_context(Path(run_dir) if run_dir else None)
    recipe = recipe or ctx.get("recipe") or {}
    done = _read_json(folder / "train_done.json") or {}
    manifest = _read_json(folder / "training_manifest.json") or {}
    ws_info = _read_json(folder / "warm_start.json") or {}
    budget = _read_json(folder / "budget.json") or {}
    info = manifest.get("info") or {}
    is_adapter = (folder / "adapter_config.json").exists() and not merged
    is_prm = (folder / "prm.json").exists()
    method = method or info.get("method") or ("sft" if ws_info or info.get("stage") == "warm_start" else None) \
        or recipe.get("method") or ("prm" if is_prm else "policy")
    lineage = base_lineage(folder)
    base = hub_base_model(lineage)
    data_files = [d.get("path", "") for d in manifest.get("data_files", []) if isinstance(d, dict)]
    if not data_files and isinstance(recipe.get("data"), dict):
        data_files = [str(recipe["data"].get("path", ""))]
    ds = known_dataset(data_files)
    results = ctx.get("results") or {}
    split = (recipe.get("data") or {}).get("eval_split") if isinstance(recipe.get("data"), dict) else None
    if split is None and run_dir and name:   # no recipe (e.g. an eval-only folder): the eval's own settings
        split = (_read_json(Path(run_dir) / "eval" / name / "config.json") or {}).get("split")
    data_name = Path(data_files[0]).name if data_files else "eval data"
    warm = bool(ws_info) or info.get("stage") == "warm_start"
    model_name = ("rag_dpo warm-start policy (SFT on oracle chains)" if warm else f"rag_dpo {method} policy") \
        + (f" ({recipe['name']})" if recipe.get("name") else "")
    evals = _eval_results(results, name, ds[0] if ds else Path(data_name).stem,
                          f"{data_name}" + (f" ({split} split)" if split else ""), split) if name else []

    tags = ["rag_dpo", "retrieval-augmented-generation", "multi-hop-qa", "process-supervision", str(method)]
    tags += ["trl"] if method in ("sft", "dpo") else []
    tags += ["lora", "peft"] if is_adapter else []
    extra: dict[str, Any] = {}
    if base:
        extra["base_model_relation"] = "adapter" if is_adapter else "finetune"
    data = ModelCardData(
        base_model=base, datasets=[ds[0]] if ds else None,
        license="apache-2.0" if base == BUNDLED_HUB_ID else None, language=["en"],
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="token-classification" if is_prm else "text-generation",
        tags=tags, model_name=model_name if evals else None, eval_results=evals or None, **extra)

    body = [f"# {model_name}", "",
            f"A retrieval agent policy trained with {str(method).upper()} by rag_dpo "
            "(`rag-dpo train`), which trains retrieval agents with process supervision: rollouts → step "
            "annotation → preference pairs → DPO / PPO → evaluation.", "",
            "## Training", ""]
    shown = [Path(p).name if Path(p).is_dir() else p for p in lineage]   # local folders by name, hub ids whole
    chain = " → ".join(reversed([folder.name] + shown)) if lineage else folder.name
    body.append(f"- **Starting point:** {chain}" + (f" (root on the hub: `{base}`)" if base else ""))
    body.append(f"- **Weights:** {'a LoRA adapter (load it on the base above)' if is_adapter else 'full model'}")
    body.append(f"- **Method:** {method}" + (f", recipe `{recipe.get('name')}`" if recipe.get("name") else ""))
    qids = manifest.get("question_ids")
    if isinstance(qids, list):
        body.append(f"- **Training questions:** {len(qids)} (ids in `training_manifest.json`, including those of the "
                    "model it started from; the evaluation refuses them)")
    for d in manifest.get("data_files", []) or []:
        if isinstance(d, dict):
            body.append(f"- **Data file:** `{d.get('path')}` sha256 `{d.get('sha256', '')}`")
    if done.get("global_step") is not None:
        body.append(f"- **Optimiser steps:** {done['global_step']}"
                    + (f", last logged loss {done['loss']:.4f}" if isinstance(done.get("loss"), (int, float)) else ""))
    if ws_info.get("questions") is not None:
        body.append(f"- **Warm start:** SFT on oracle chains of {ws_info['questions']} train questions"
                    + (f", built in {ws_info['build_minutes']} min" if ws_info.get("build_minutes") else ""))
    if budget:
        shown = {k: budget[k] for k in ("questions", "rollouts", "generated_tokens", "policy_steps") if k in budget}
        body.append("- **Rollout budget spent:** " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    flags = (done.get("health") or {}).get("flags") or []
    body.append("- **Training health:** " + ("; ".join(flags) if flags else "no collapse signs flagged"))
    if ctx.get("data_hashes"):
        body += ["", "### Data hashes (sha256)", "", "| file | sha256 |", "|---|---|"]
        body += [f"| `{k}` | `{v}` |" for k, v in ctx["data_hashes"].items()]
    if recipe:
        import yaml
        body += ["", "### Recipe", "", "<details><summary>resolved recipe (every default filled in)</summary>", "",
                 "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", "", "</details>"]
    body += ["", "## Evaluation", ""]
    if results:
        body += [f"Greedy agent on the {split or 'eval'} split of `{data_name}`, next to the warm start and base "
                 "model of the same run:", "", eval_table_markdown(results, name)]
        verdict = _verdict(ctx.get("results_md"))
        if verdict:
            body += ["", verdict]
    else:
        body.append("Not evaluated yet: `rag-dpo eval --policy <this folder> --split test ...` or the pipeline's "
                    "eval step (`rag-dpo train RECIPE`) writes the table here.")
    body += ["", "## Intended use and limits", "", INTENDED_USE, "", "## How to use", "", "```python",
             "from rag_dpo.agent.policy import load_policy",
             "model, tokenizer = load_policy(\"path/to/this/folder\")   # adapter or full model", "```", "",
             "or score it: `rag-dpo eval --policy path/to/this/folder --data QUESTIONS.jsonl --split test`."]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    return ModelCard(content)


def write_model_card(folder: str | Path, run_dir: str | Path | None = None, name: str | None = None,
                     recipe: dict | None = None, method: str | None = None) -> Path | None:
    """Write `folder/README.md` (atomically); never fatal: a card problem is reported and training goes on."""
    from rag_dpo.io import atomic_write_text
    folder = Path(folder)
    try:
        card = model_card(folder, run_dir=run_dir, name=name, recipe=recipe, method=method)
    except Exception as e:   # a card is documentation; it must never lose a finished training run
        print(f"[rag-dpo] warning: no model card for {folder}: {e}", flush=True)
        return None
    path = folder / CARD_NAME
    atomic_write_text(path, str(card))
    return path


# ---- dataset cards --------------------------------------------------------------------------------------------

KIND_TEXT = {
    "step": "step-level preference pairs `{prompt, chosen, rejected}` between sibling steps of one prefix (the "
            "prompt holds the question, earlier steps and their retrieved text)",
    "outcome": "outcome-level preference pairs: two finished paths for one question, one right and one wrong",
    "sft": "supervised rows `{prompt, completion}`",
    "stepwise": "stepwise supervision `{prompt, completions, labels}` (one row per path; PRM training)",
}


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def dataset_card(folder: str | Path, name: str | None = None):
    """The huggingface_hub DatasetCard of a pairs / SFT dataset folder (save_to_disk + budget.json, config.json,
    question_ids.json as rag_dpo.pairs writes them): kind, annotator, pairing rule, budget, counts."""
    from huggingface_hub import DatasetCard, DatasetCardData
    folder = Path(folder)
    name = name or folder.name
    budget = _read_json(folder / "budget.json") or {}
    cfg = _read_json(folder / "config.json") or {}
    qids = _read_json(folder / "question_ids.json") or []
    info = _read_json(folder / "dataset_info.json") or {}
    kind = cfg.get("kind", name)
    rows = int(budget.get("rows", 0))
    ds = known_dataset([str(cfg.get("labels", "")), str(folder)])
    tags = ["rag_dpo", "retrieval-augmented-generation", "multi-hop-qa", str(kind)]
    tags += ["dpo", "preference"] if kind in ("step", "outcome") else ["sft"] if kind == "sft" else ["prm"]
    data = DatasetCardData(language=["en"], license=ds[1] if ds else None, pretty_name=f"rag_dpo {kind} data ({name})",
                           size_categories=[_size_category(rows)], source_datasets=[ds[0]] if ds else None,
                           task_categories=["text-generation"], tags=tags)
    rule = "whole right paths (level chain)" if kind == "sft" and cfg.get("level") == "chain" else cfg.get("rule")
    body = [f"# rag_dpo {kind} dataset: {name}", "",
            f"Made by `rag_dpo.pairs` from labelled agent chains: {KIND_TEXT.get(kind, kind)}. Retrieved text is "
            "marked by the `*_info_spans` columns (character spans) and is never a training target.", "",
            "| | |", "|---|---|",
            f"| kind | {kind} |",
            f"| annotator (step labels) | {cfg.get('annotator') or budget.get('annotator') or 'none'} |",
            f"| pairing rule | {rule} |",
            f"| margin / dedup | {cfg.get('margin')} / {cfg.get('dedup')} |",
            f"| rows | {rows} |",
            f"| questions (input / with rows) | {len(qids)} / {budget.get('questions_with_rows', '')} |"]
    if budget.get("rows_by_action"):
        body.append(f"| rows by action | {', '.join(f'{k} {v}' for k, v in budget['rows_by_action'].items())} |")
    body += ["", "## Budget (what producing it cost)", "", "| | |", "|---|---|"]
    for k in ("questions", "chains", "policy_steps", "policy_generated_tokens", "annotation_rollouts",
              "annotation_generated_tokens", "judge_calls", "rollouts", "generated_tokens"):
        if k in budget:
            body.append(f"| {k} | {_fmt(budget[k])} |")
    if cfg.get("labels"):
        body += ["", f"Source: `{cfg['labels']}` (sha256 `{cfg.get('labels_sha256', '')}`), tokenizer "
                     f"`{cfg.get('tokenizer', '')}`. Every setting is in `config.json`, every question id (the split "
                     "guard treats all as trained on) in `question_ids.json`."]
    feats = info.get("features") if isinstance(info, dict) else None
    if isinstance(feats, dict):
        body += ["", "Columns: " + ", ".join(f"`{c}`" for c in feats)]
    body += ["", "## Load", "", "```python", "from datasets import load_from_disk",
             "rows = load_from_disk(\"path/to/this/folder\")", "```", "",
             "Train on it with `rag_dpo.train` (DPO / SFT / PRM), which masks the retrieved text; TRL's trainers "
             "used directly would score it.",
             "", "## Limits", "",
             "Labels come from an automatic step annotator over a small policy's rollouts on a few hundred English "
             "multi-hop Wikipedia questions: they are noisy, and the questions inherit the source data's license."]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def write_dataset_card(folder: str | Path, name: str | None = None) -> Path | None:
    """Write `folder/README.md` (atomically); never fatal."""
    from rag_dpo.io import atomic_write_text
    folder = Path(folder)
    try:
        card = dataset_card(folder, name)
    except Exception as e:
        print(f"[rag-dpo] warning: no dataset card for {folder}: {e}", flush=True)
        return None
    path = folder / CARD_NAME
    atomic_write_text(path, str(card))
    return path
