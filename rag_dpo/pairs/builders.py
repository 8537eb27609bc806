"""From labelled chain trees to training data in TRL's dataset formats, saved with `datasets.save_to_disk`.

Four kinds (`build_dataset(..., kind=...)`):
- `step`: step-level preference pairs `{prompt, chosen, rejected}` between siblings of one prefix. The prompt is
  `protocol.render_context` of the shared prefix (question, earlier steps, their retrieved text); chosen/rejected
  are the two steps' own text. Pairing rules: `best-vs-worst` (one pair per prefix), `all-margin` (every pair
  whose values differ by >= margin), `same-action` (best vs worst among search steps and among answer steps
  separately). Values must always differ by >= margin (and by more than 0). Near-duplicates are never paired
  (`dedup`): two search steps retrieving the same passage set, two answers equal after normalisation, or equal text.
- `outcome`: outcome-level pairs, two finished paths for one question (across the question's chain records and
  tree leaves), one right (final F1 >= right_threshold) and one wrong. The prompt is the question prompt and
  chosen/rejected are the whole paths' text, which contains retrieved text.
- `sft`: positives `{prompt, completion}`: `level="step"` gives the chosen steps of the step pairs (the
  single-direction baseline on the same data), `level="chain"` the whole right paths (e.g. oracle chains for the
  warm start; no labels needed).
- `stepwise`: TRL stepwise supervision `{prompt, completions, labels}` for PRM training, one row per leaf path
  (format details in `annotate/prm.py`).

Retrieved text is context, never a target: every completion column `X` has `X_info_spans`, the [start, end)
character spans of retrieved text inside it (`chosen_info_spans`, `rejected_info_spans`, `completion_info_spans`;
empty for single steps, whose retrieved text lives in the next prompt). Trainers turn them into token masks.
EOS is trained only where the policy's turn ended (`protocol.ends_turn`: an answer step): every completion column
`X` also has `X_ends_turn`, so a trainer appends EOS from the data, not from the text (a rejected invalid step
such as `<answer></answer>` ends with the answer tag, but the policy never ended its turn there).
Rows stay text (trainers tokenize); extra columns (ids, values, actions) are metadata TRL drops.

Every dataset folder also gets `budget.json` (what produced the data: questions, chains, policy steps and
generated tokens, plus the chosen annotator's rollouts, generated tokens and judge calls summed from its label
costs), `question_ids.json` (every question of the input: the split guard must treat all of them as seen), and
`config.json` (kind, settings, input file and its hash).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rag_dpo.errors import InputError
from rag_dpo.metrics import f1_score, normalize_answer
from rag_dpo.records import ANSWER, SEARCH, Chain, Step

KINDS = ("step", "outcome", "sft", "stepwise")
RULES = ("best-vs-worst", "all-margin", "same-action")


@dataclass
class PairConfig:
    annotator: str | None = None      # whose labels to use; None = the only annotator present in the file
    rule: str = "best-vs-worst"       # step/outcome pairing: best-vs-worst | all-margin | same-action (step only)
    margin: float = 0.1               # minimum value difference between chosen and rejected
    dedup: bool = True                # never pair near-duplicate steps (same passages / same answer / same text)
    right_threshold: float = 0.5      # a finished path is "right" when its final F1 >= this (outcome, sft chain)
    max_pairs_per_question: int = 4   # cap on outcome pairs per question (all-margin)
    level: str = "step"               # sft: "step" (chosen steps) or "chain" (whole right paths)


# ---- helpers -------------------------------------------------------------------------------------------------
def chain_text(steps: Sequence[Step]) -> tuple[str, list[list[int]]]:
    """A path's text after the prompt (steps and observations) and the character spans of the observations."""
    text, spans = "", []
    for s in steps:
        text += s.text
        if s.observation:
            spans.append([len(text), len(text) + len(s.observation)])
            text += s.observation
    return text, spans


def near_duplicate(a: Step, b: Step) -> bool:
    if a.text.strip() == b.text.strip():
        return True
    if a.action == SEARCH and b.action == SEARCH:
        return set(a.retrieved_ids) == set(b.retrieved_ids)
    if a.action == ANSWER and b.action == ANSWER:
        return normalize_answer(a.answer or "") == normalize_answer(b.answer or "")
    return False


def annotator_of(chains: Sequence[Chain], requested: str | None, file: str | None = None) -> str:
    names = {n for c in chains for s in c.steps for n in s.labels}
    if requested:
        if chains and requested not in names:
            raise InputError(f"no step carries {requested!r} labels (found: {', '.join(sorted(names)) or 'none'})",
                             file=file, field="annotator")
        return requested
    if len(names) != 1:
        raise InputError(f"choose the labels to use with --annotator (found: {', '.join(sorted(names)) or 'none'})",
                         file=file, field="annotator")
    return names.pop()


def _value(step: Step, name: str, chain: Chain) -> float:
    label = step.labels.get(name)
    if label is None:
        raise InputError(f"question {chain.question_id}, step {step.id}: no {name!r} label", field="labels")
    return label.value


def finished_paths(chain: Chain) -> list[list[Step]]:
    """Root-to-leaf paths that ended: an answer, an invalid step or the step limit (the last two are wrong outcomes,
    F1 0); see `annotate.annotators.finished_leaves`."""
    from rag_dpo.annotate.annotators import finished_leaves
    return [chain.path(leaf.id) for leaf in finished_leaves(chain)]


def path_f1(chain: Chain, path: Sequence[Step]) -> float:
    last = path[-1] if path else None
    return f1_score(last.answer, chain.gold_answers) if last is not None and last.action == ANSWER else 0.0


def _pick(cands: list[tuple[float, Step]], cfg: PairConfig, best_only: bool) -> list[tuple[tuple, tuple]]:
    """Pairs (chosen, rejected) among (value, step) candidates under margin and dedup."""
    desc = sorted(cands, key=lambda x: -x[0])
    out = []
    for hi in desc:
        for lo in reversed(desc):
            diff = hi[0] - lo[0]
            if diff <= 0 or diff < cfg.margin or (cfg.dedup and near_duplicate(hi[1], lo[1])):
                continue
            out.append((hi, lo))
            if best_only:
                return out
    return out


# ---- builders ------------------------------------------------------------------------------------------------
def step_pairs(chains: Sequence[Chain], tokenizer, cfg: PairConfig, name: str) -> list[dict]:
    from rag_dpo.agent.protocol import ends_turn, render_context
    from rag_dpo.annotate.annotators import sibling_groups
    if cfg.rule not in RULES:
        raise InputError(f"unknown rule {cfg.rule!r} (choose from {', '.join(RULES)})", field="rule")
    rows = []
    for chain in chains:
        for parent, kids in sibling_groups(chain):
            if len(kids) < 2:
                continue
            cands = [(_value(s, name, chain), s) for s in kids]
            if cfg.rule == "same-action":
                pairs = [p for act in (SEARCH, ANSWER)
                         for p in _pick([c for c in cands if c[1].action == act], cfg, best_only=True)]
            else:
                pairs = _pick(cands, cfg, best_only=cfg.rule == "best-vs-worst")
            if not pairs:
                continue
            prompt = render_context(tokenizer, chain.question, chain.path(parent) if parent is not None else [])
            for (cv, c), (rv, r) in pairs:
                rows.append({"prompt": prompt, "chosen": c.text, "rejected": r.text, "chosen_info_spans": [],
                             "rejected_info_spans": [], "chosen_ends_turn": ends_turn(c),
                             "rejected_ends_turn": ends_turn(r), "question_id": chain.question_id,
                             "prefix_id": parent or "",
                             "chosen_id": c.id, "rejected_id": r.id, "chosen_value": cv, "rejected_value": rv,
                             "chosen_action": c.action, "rejected_action": r.action, "annotator": name})
    return rows


def _by_question(chains: Sequence[Chain]) -> dict[str, list[Chain]]:
    out: dict[str, list[Chain]] = {}
    for c in chains:
        out.setdefault(c.question_id, []).append(c)
    return out


def outcome_pairs(chains: Sequence[Chain], tokenizer, cfg: PairConfig) -> list[dict]:
    from rag_dpo.agent.protocol import ends_turn, render_prompt
    if cfg.rule not in ("best-vs-worst", "all-margin"):
        raise InputError(f"rule {cfg.rule!r} does not apply to outcome pairs (best-vs-worst or all-margin)",
                         field="rule")
    rows = []
    for qid, group in _by_question(chains).items():
        paths = []
        for c in group:
            for p in finished_paths(c):
                paths.append((path_f1(c, p), c, p))
        right = sorted([x for x in paths if x[0] >= cfg.right_threshold], key=lambda x: -x[0])
        wrong = sorted([x for x in paths if x[0] < cfg.right_threshold], key=lambda x: x[0])
        n = 0
        for hi in right:
            for lo in wrong:
                if hi[0] - lo[0] < cfg.margin or n >= (1 if cfg.rule == "best-vs-worst" else cfg.max_pairs_per_question):
                    continue
                ctext, cspans = chain_text(hi[2])
                rtext, rspans = chain_text(lo[2])
                if cfg.dedup and ctext.strip() == rtext.strip():
                    continue
                rows.append({"prompt": render_prompt(tokenizer, hi[1].question), "chosen": ctext, "rejected": rtext,
                             "chosen_info_spans": cspans, "rejected_info_spans": rspans,
                             "chosen_ends_turn": ends_turn(hi[2][-1]), "rejected_ends_turn": ends_turn(lo[2][-1]),
                             "question_id": qid,
                             "chosen_value": hi[0], "rejected_value": lo[0],
                             "chosen_steps": len(hi[2]), "rejected_steps": len(lo[2])})
                n += 1
    return rows


def sft_rows(chains: Sequence[Chain], tokenizer, cfg: PairConfig, name: str | None) -> list[dict]:
    from rag_dpo.agent.protocol import ends_turn, render_prompt
    if cfg.level == "step":
        rows, seen = [], set()
        for r in step_pairs(chains, tokenizer, cfg, name):
            key = (r["question_id"], r["chosen_id"])
            if key not in seen:
                seen.add(key)
                rows.append({"prompt": r["prompt"], "completion": r["chosen"], "completion_info_spans": [],
                             "completion_ends_turn": r["chosen_ends_turn"], "question_id": r["question_id"],
                             "value": r["chosen_value"]})
        return rows
    if cfg.level != "chain":
        raise InputError(f"unknown sft level {cfg.level!r} (step or chain)", field="level")
    rows = []
    for c in chains:
        for p in finished_paths(c):
            f1 = path_f1(c, p)
            if f1 >= cfg.right_threshold:
                text, spans = chain_text(p)
                rows.append({"prompt": render_prompt(tokenizer, c.question), "completion": text,
                             "completion_info_spans": spans, "completion_ends_turn": ends_turn(p[-1]),
                             "question_id": c.question_id, "value": f1})
    return rows


def stepwise_rows(chains: Sequence[Chain], tokenizer, name: str) -> list[dict]:
    from rag_dpo.agent.protocol import render_prompt
    rows = []
    for c in chains:
        for leaf in c.leaves():
            path = c.path(leaf.id)
            comps, spans, labels, values, prev = [], [], [], [], ""
            for s in path:
                label = s.labels.get(name)
                if label is None:
                    raise InputError(f"question {c.question_id}, step {s.id}: no {name!r} label", field="labels")
                comps.append(prev + s.text)
                spans.append([[0, len(prev)]] if prev else [])
                labels.append(bool(label.good))
                values.append(float(label.value))
                prev = s.observation
            rows.append({"prompt": render_prompt(tokenizer, c.question), "completions": comps, "labels": labels,
                         "completion_info_spans": spans, "values": values, "question_id": c.question_id})
    return rows


def _features(kind: str):
    from datasets import Features, List, Value
    s, f, i, b = Value("string"), Value("float64"), Value("int64"), Value("bool")
    spans = List(List(i))
    if kind == "step":
        return Features({"prompt": s, "chosen": s, "rejected": s, "chosen_info_spans": spans,
                         "rejected_info_spans": spans, "chosen_ends_turn": b, "rejected_ends_turn": b,
                         "question_id": s, "prefix_id": s, "chosen_id": s,
                         "rejected_id": s, "chosen_value": f, "rejected_value": f, "chosen_action": s,
                         "rejected_action": s, "annotator": s})
    if kind == "outcome":
        return Features({"prompt": s, "chosen": s, "rejected": s, "chosen_info_spans": spans,
                         "rejected_info_spans": spans, "chosen_ends_turn": b, "rejected_ends_turn": b,
                         "question_id": s, "chosen_value": f, "rejected_value": f,
                         "chosen_steps": i, "rejected_steps": i})
    if kind == "sft":
        return Features({"prompt": s, "completion": s, "completion_info_spans": spans, "completion_ends_turn": b,
                         "question_id": s, "value": f})
    return Features({"prompt": s, "completions": List(s), "labels": List(Value("bool")),
                     "completion_info_spans": List(spans), "values": List(f), "question_id": s})


def budget(chains: Sequence[Chain], annotator: str | None) -> dict:
    """What producing the data cost: policy generation plus the chosen annotator's label costs."""
    steps = [s for c in chains for s in c.steps]
    cost = {"rollouts": 0.0, "generated_tokens": 0.0, "judge_calls": 0.0}
    if annotator:
        for s in steps:
            lab = s.labels.get(annotator)
            for key in cost:
                cost[key] += float(lab.cost.get(key, 0.0)) if lab else 0.0
    policy_tokens = sum(s.generated_tokens for s in steps)
    return {"questions": len({c.question_id for c in chains}), "chains": len(chains), "policy_steps": len(steps),
            "policy_generated_tokens": policy_tokens, "annotator": annotator,
            "annotation_rollouts": cost["rollouts"], "annotation_generated_tokens": cost["generated_tokens"],
            "judge_calls": cost["judge_calls"],
            "rollouts": len(chains) + cost["rollouts"], "generated_tokens": policy_tokens + cost["generated_tokens"]}


def rows_by_action(rows: Sequence[dict]) -> dict[str, int]:
    """Step pairs counted by `chosen action>rejected action` (e.g. `search>invalid`): which decisions the pairs
    teach (a pool whose pairs mostly prefer answers over searches teaches the policy to stop searching)."""
    out: dict[str, int] = {}
    for r in rows:
        key = f"{r['chosen_action']}>{r['rejected_action']}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def build_rows(chains: Sequence[Chain], kind: str, tokenizer, cfg: PairConfig, file: str | None = None
               ) -> tuple[list[dict], str | None]:
    """Rows of one kind, and the annotator whose labels were used (None when labels were not needed)."""
    if kind not in KINDS:
        raise InputError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})", field="kind")
    if kind == "outcome":
        return outcome_pairs(chains, tokenizer, cfg), cfg.annotator
    if kind == "sft" and cfg.level == "chain":
        return sft_rows(chains, tokenizer, cfg, None), cfg.annotator
    name = annotator_of(chains, cfg.annotator, file)
    if kind == "step":
        return step_pairs(chains, tokenizer, cfg, name), name
    if kind == "sft":
        return sft_rows(chains, tokenizer, cfg, name), name
    return stepwise_rows(chains, tokenizer, name), name


def save_dataset(rows: list[dict], kind: str, out_dir: str | Path, extra: dict[str, object]) -> Path:
    """`save_to_disk` into a temp folder, add the JSON side files, then swap it into place (atomic for readers)."""
    from datasets import Dataset

    from rag_dpo.io import atomic_write_json
    feats = _features(kind)
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in feats}, features=feats)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    ds.save_to_disk(str(tmp), num_shards=1)   # one shard even when empty (0 shards do not load back)
    for fname, obj in extra.items():
        atomic_write_json(tmp / fname, obj)
    from rag_dpo.cards import write_dataset_card
    write_dataset_card(tmp, name=out.name)   # README.md with hub metadata: kind, annotator, rule, budget, counts
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def build_dataset(labels_path: str | Path, kind: str, out_dir: str | Path, tokenizer, cfg: PairConfig | None = None
                  ) -> Path:
    """Read labelled chains, build rows of `kind`, save the dataset with budget.json / question_ids.json."""
    import dataclasses

    from rag_dpo.io import file_sha256
    from rag_dpo.records import read_chains
    cfg = cfg or PairConfig()
    chains = read_chains(labels_path)
    rows, name = build_rows(chains, kind, tokenizer, cfg, file=str(labels_path))
    spend = budget(chains, name)
    spend["rows"] = len(rows)
    spend["questions_with_rows"] = len({r["question_id"] for r in rows})
    if kind == "step":
        spend["rows_by_action"] = rows_by_action(rows)
    qids = sorted({c.question_id for c in chains})
    config = {"kind": kind, **dataclasses.asdict(cfg), "annotator": name, "labels": str(labels_path),
              "labels_sha256": file_sha256(labels_path), "tokenizer": getattr(tokenizer, "name_or_path", "")}
    return save_dataset(rows, kind, out_dir, {"budget.json": spend, "question_ids.json": qids,
                                              "config.json": config})
