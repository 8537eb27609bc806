"""Step annotators: one interface, five ways to say how good each step of a chain tree is.

`Annotator.annotate(chains)` sets `step.labels[name] = Label(value, good, annotator, cost)` on every step, where
`good = value >= threshold`. The unit of work is a *sibling group*: the steps that share one prefix (a linear
rollout has groups of one). Annotators that compare candidates (judge, prm) need the group; the others label steps
one by one but still receive groups so tree search can score fresh candidates with the same call
(`label_groups`). Costs are per label and are split evenly over a group when one call served the whole group, so
summing `cost` over all steps gives what the annotation spent (pairs' `budget.json` does exactly that).

- `outcome`: a step's value is the mean final-answer F1 over the finished paths through it (a linear chain: its
  final answer's F1; a path that ended in an invalid step or at the step limit counts as F1 0) — the outcome-only
  baseline. It cannot guide tree search (fresh candidates have no outcome).
- `evidence`: a search step is worth 1 when it retrieves a supporting passage not retrieved earlier on its path,
  else 0; an answer step is worth its F1 against the gold answers; an invalid step is worth 0.
- `rollout`: Monte-Carlo. N continuations from the prefix ending with the step (one `continue_from` call for all
  steps of a batch; the engine generates the N continuations of a prefix together). Each continuation's final F1
  is discounted by the steps it took, counting the step itself (shortest-path reward estimation):
  value = mean_i F1_i * gamma ** steps_i; a continuation that fails (invalid step, step limit) has F1 0 and stays
  in the mean. An answer step needs no rollout: value = F1 * gamma; an invalid step ends its chain (the engine
  does not continue it): value 0.
- `judge`: an LLM ranks the K candidates of a group (RAG-Gym); see `judge.py`.
- `prm`: a trained process reward model scores the candidates of a group; see `prm.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rag_dpo.errors import InputError
from rag_dpo.metrics import f1_score
from rag_dpo.io import atomic_write_text
from rag_dpo.records import (ANSWER, INVALID, SEARCH, Chain, Label, Step, append_chains, done_question_ids,
                             read_chains, write_chains)

ANNOTATORS = ("outcome", "evidence", "rollout", "judge", "prm")


@dataclass
class JudgeConfig:
    url: str | None = None            # OpenAI-compatible endpoint (".../v1" or ".../v1/chat/completions"); None = local HF
    model: str = ""                   # model name sent to the endpoint, or HF name/folder of a local judge
    api_key_env: str | None = None    # name of the environment variable holding the API key (never the key itself)
    max_new_tokens: int = 32          # judge reply budget (a ranking like "2,1,3")
    temperature: float = 0.0
    timeout_s: float = 60.0           # per HTTP request
    max_retries: int = 2              # extra attempts after a failed HTTP request
    batch_size: int = 8               # prompts per local generate call


@dataclass
class AnnotatorConfig:
    threshold: float = 0.5            # good = value >= threshold
    gamma: float = 0.9                # rollout: per-step discount (shortest-path reward estimation)
    rollouts: int = 4                 # rollout: continuations per step
    batch_chains: int = 8             # chains annotated per batch (and per resumable append)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    prm_path: str | None = None       # prm: folder saved in the PRM format (annotate/prm.py)


def sibling_groups(chain: Chain) -> list[tuple[str | None, list[Step]]]:
    """(parent id, children) for every prefix of the tree, in step order."""
    groups: dict[str | None, list[Step]] = {}
    for s in chain.steps:
        groups.setdefault(s.parent, []).append(s)
    return list(groups.items())


def path_retrieved(chain: Chain, step: Step) -> set[str]:
    return {pid for s in chain.prefix(step.id) for pid in s.retrieved_ids}


class Annotator:
    """Base class: `label_groups` labels lists of sibling steps; `annotate` labels every step of whole chains."""

    name = ""
    guides_search = True              # can it score fresh candidates (tree search)?

    def __init__(self, cfg: AnnotatorConfig | None = None):
        self.cfg = cfg or AnnotatorConfig()

    def label(self, value: float, cost: dict | None = None, **info) -> Label:
        return Label(value=float(value), good=bool(value >= self.cfg.threshold), annotator=self.name,
                     cost={"rollouts": 0.0, "generated_tokens": 0.0, "judge_calls": 0.0, **(cost or {})}, info=info)

    def label_groups(self, groups: Sequence[tuple[Chain, list[Step]]]) -> None:
        raise NotImplementedError

    def annotate(self, chains: list[Chain]) -> list[Chain]:
        groups = [(c, kids) for c in chains for _, kids in sibling_groups(c)]
        self.label_groups(groups)
        return chains


class OutcomeAnnotator(Annotator):
    name = "outcome"
    guides_search = False

    def label_groups(self, groups):
        for chain, steps in groups:
            finished = finished_leaves(chain)
            for s in steps:
                below = [leaf for leaf in finished if s.id in {p.id for p in chain.path(leaf.id)}]
                scores = [f1_score(leaf.answer, chain.gold_answers) if leaf.action == ANSWER else 0.0
                          for leaf in below]
                value = sum(scores) / len(scores) if scores else 0.0
                s.labels[self.name] = self.label(value, paths=len(scores))


def step_limit(chain: Chain) -> int | None:
    """The depth at which this chain's paths were cut off: the tree search's limit, else the sampler's."""
    limit = (chain.meta.get("tree_search") or {}).get("max_steps") or (chain.sampling or {}).get("max_steps")
    return int(limit) if limit else None


def finished_leaves(chain: Chain) -> list[Step]:
    """Leaves whose path is a finished chain: an answer, an invalid step (the engine never continues one), a leaf
    at the step limit, and the selected leaf. A failed chain (invalid step, step limit) is a *wrong* outcome, not a
    missing one: dropping it would make a policy that often fails look as good as its few answers. Only a losing
    tree-search candidate below the limit (a search step nobody continued) is unfinished."""
    limit = step_limit(chain)
    return [leaf for leaf in chain.leaves()
            if leaf.action in (ANSWER, INVALID) or leaf.id == chain.selected
            or (limit is not None and len(chain.path(leaf.id)) >= limit)]


class EvidenceAnnotator(Annotator):
    name = "evidence"

    def label_groups(self, groups):
        for chain, steps in groups:
            if not chain.supporting_ids:
                raise InputError(f"question {chain.question_id}: the evidence annotator needs supporting passage "
                                 "ids and this chain has none", field="supporting_ids")
            support = set(chain.supporting_ids)
            for s in steps:
                if s.action == SEARCH:
                    new = (set(s.retrieved_ids) & support) - path_retrieved(chain, s)
                    s.labels[self.name] = self.label(1.0 if new else 0.0, new_supporting=sorted(new))
                elif s.action == ANSWER:
                    s.labels[self.name] = self.label(f1_score(s.answer, chain.gold_answers))
                else:
                    s.labels[self.name] = self.label(0.0, invalid=True)


class RolloutAnnotator(Annotator):
    """Monte-Carlo values through the rollout engine's `continue_from` (batched over every step of a batch)."""

    name = "rollout"

    def __init__(self, engine, cfg: AnnotatorConfig | None = None):
        super().__init__(cfg)
        self.engine = engine

    def label_groups(self, groups):
        gamma, n = self.cfg.gamma, self.cfg.rollouts
        todo: list[tuple[Chain, Step]] = []
        for chain, steps in groups:
            for s in steps:
                if s.action == ANSWER:
                    s.labels[self.name] = self.label(f1_score(s.answer, chain.gold_answers) * gamma)
                elif s.action == INVALID:   # the engine does not continue after a parse failure
                    s.labels[self.name] = self.label(0.0, invalid=True)
                else:
                    todo.append((chain, s))
        if not todo:
            return
        conts = self.engine.continue_from([(c, s.id) for c, s in todo], n)
        if len(conts) != len(todo):
            raise RuntimeError(f"continue_from returned {len(conts)} results for {len(todo)} prefixes")
        for (chain, s), runs in zip(todo, conts):
            scores, tokens = [], 0
            for run in runs:
                last = run[-1] if run else None
                f1 = f1_score(last.answer, chain.gold_answers) if last is not None and last.action == ANSWER else 0.0
                scores.append(f1 * gamma ** (1 + len(run)))
                tokens += sum(x.generated_tokens for x in run)
            value = sum(scores) / len(scores) if scores else 0.0
            s.labels[self.name] = self.label(value, {"rollouts": float(len(runs)), "generated_tokens": float(tokens)},
                                             returns=[round(x, 4) for x in scores])


def rank_values(order: Sequence[int], k: int) -> list[float]:
    """Values in [0, 1] from a ranking (indices best first): best 1, worst 0, unranked candidates 0."""
    vals = [0.0] * k
    if k == 1:
        return [1.0 if order else 0.0]
    for r, i in enumerate(order):
        vals[i] = (k - 1 - r) / (k - 1)
    return vals


def build_annotator(name: str, cfg: AnnotatorConfig | None = None, engine=None, judge=None, prm=None) -> Annotator:
    """Annotator by name. `rollout` needs a RolloutEngine; `judge` a judge backend (or cfg.judge to build one);
    `prm` a PRMScorer (or cfg.prm_path)."""
    cfg = cfg or AnnotatorConfig()
    if name == "outcome":
        return OutcomeAnnotator(cfg)
    if name == "evidence":
        return EvidenceAnnotator(cfg)
    if name == "rollout":
        if engine is None:
            raise InputError("the rollout annotator needs a policy and a retriever (--policy, --data/--corpus)",
                             field="annotator")
        return RolloutAnnotator(engine, cfg)
    if name == "judge":
        from rag_dpo.annotate.judge import JudgeAnnotator, build_judge_backend
        return JudgeAnnotator(judge or build_judge_backend(cfg.judge), cfg)
    if name == "prm":
        from rag_dpo.annotate.prm import PRMAnnotator, PRMScorer
        if prm is None:
            if not cfg.prm_path:
                raise InputError("the prm annotator needs a saved PRM folder (--prm PATH)", field="prm_path")
            prm = PRMScorer.load(cfg.prm_path)
        return PRMAnnotator(prm, cfg)
    raise InputError(f"unknown annotator {name!r} (known: {', '.join(ANNOTATORS)})", field="annotator")


def annotate_file(chains_path: str | Path, annotator: Annotator, out_path: str | Path, progress: bool = True) -> Path:
    """Label every chain of `chains_path` and write them to `out_path`, resumably.

    All chains of one question are appended together (one fsynced write), so a rerun skips finished questions.
    A question whose chains were only partly written when the process died is dropped from the output (atomic
    rewrite) and redone. `out_path.annotate.json` records the annotator and its config; resuming with different
    ones is refused rather than mixing labels. Under a multi-process launch each rank labels its shard of the
    questions and rank 0 alone writes."""
    import json

    from tqdm.auto import tqdm

    from rag_dpo.config import to_dict
    from rag_dpo.distributed import barrier, is_main, run_sharded
    from rag_dpo.io import atomic_write_json, iter_jsonl, repair_jsonl

    chains_path, out_path = Path(chains_path), Path(out_path)
    if chains_path.resolve() == out_path.resolve():
        raise InputError("--out must differ from --chains (the input is read while the output is appended)",
                         file=str(out_path))
    groups: dict[str, list[Chain]] = {}
    for c in read_chains(chains_path):
        groups.setdefault(c.question_id, []).append(c)

    meta_path = out_path.with_name(out_path.name + ".annotate.json")
    meta = {"annotator": annotator.name, "config": to_dict(annotator.cfg), "chains": str(chains_path)}
    if out_path.exists() and meta_path.exists():
        old = json.loads(meta_path.read_text())
        if (old.get("annotator"), old.get("config")) != (meta["annotator"], meta["config"]):
            raise InputError(f"{out_path} was started with annotator {old.get('annotator')!r} and other settings; "
                             "use another --out or delete it", file=str(meta_path), field="annotator")
    if is_main():
        atomic_write_json(meta_path, meta)
    if out_path.exists() and is_main():   # keep only questions written completely
        repair_jsonl(out_path)
        lines = list(iter_jsonl(out_path))
        written: dict[str, int] = {}
        for _, obj in lines:
            written[obj.get("question_id")] = written.get(obj.get("question_id"), 0) + 1
        bad = {q for q, n in written.items() if q not in groups or n != len(groups[q])}
        if bad:
            atomic_write_text(out_path, "".join(json.dumps(obj, ensure_ascii=False) + "\n"
                                                for _, obj in lines if obj.get("question_id") not in bad))
    barrier("annotate")   # every rank reads the file rank 0 repaired
    done = done_question_ids(out_path)
    todo = [q for q in groups if q not in done]
    bar = tqdm(total=len(groups), initial=len(groups) - len(todo), unit="question", desc=f"annotate {annotator.name}",
               disable=not progress or not is_main())

    def batches(qids):   # one list of chains per question
        batch: list[str] = []
        for i, qid in enumerate(qids):
            batch.append(qid)
            if sum(len(groups[q]) for q in batch) >= annotator.cfg.batch_chains or i == len(qids) - 1:
                annotator.annotate([c for q in batch for c in groups[q]])
                yield [groups[q] for q in batch]
                batch = []

    def write(per_question):
        append_chains(out_path, [c for chains in per_question for c in chains])
        bar.update(len(per_question))
    try:
        run_sharded(todo, batches, write, stage="annotate")
    finally:
        bar.close()
    if not out_path.exists() and is_main():
        write_chains(out_path, [])
    barrier("annotate")
    return out_path
