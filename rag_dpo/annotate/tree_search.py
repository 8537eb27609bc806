"""Tree search that produces the step-level data (RAG-Gym): sample K candidate next steps at a prefix, score them
with an annotator, continue from the best, until an answer, an invalid best step, or the step limit.

The result is one chain tree per question: the path of best candidates plus, at every prefix, the K-1 siblings
that lost (stored, labelled, and by default never continued). `chain.selected` is the last step of the best path.
All questions of a batch advance together: one `sample_next_steps` call and one `label_groups` call per depth.

`finish=True` then completes every losing search step by sampling one step at a time (all of a batch together)
to an answer, an invalid step or the step limit, labelling each new step. The tree then also holds whole right and
wrong chains for every question, so outcome-level pairs and SFT get data from the same pool as step-level pairs
(without it a weak policy's pool has almost no finished right paths: the tree only finishes the path it follows).
`tree_search_to_file` appends finished batches whole and skips questions already in the file (resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rag_dpo.errors import InputError
from rag_dpo.records import ANSWER, INVALID, Chain, Question, append_chains, done_question_ids


@dataclass
class TreeSearchConfig:
    k: int = 4                 # candidate next steps sampled per prefix
    final_k: int | None = None # candidates at the last depth, where a chain must answer (None = k): answers are short
                               # and share their prefix, so more of them buy right-vs-wrong answer pairs cheaply
    max_steps: int | None = None   # depth limit; None = the engine's RolloutConfig.max_steps
    batch_questions: int = 8   # questions searched together (and appended to the output together)
    finish: bool = False       # also complete every losing search step to a finished chain (outcome data)
    progress: bool = True


def tree_search(questions: Sequence[Question], engine, annotator, cfg: TreeSearchConfig | None = None) -> list[Chain]:
    """Chain trees for `questions`; every step carries `annotator`'s label."""
    cfg = cfg or TreeSearchConfig()
    if not getattr(annotator, "guides_search", True):
        raise InputError(f"the {annotator.name} annotator cannot score unfinished steps, so it cannot guide tree "
                         "search (use evidence, rollout, judge or prm)", field="annotator")
    max_steps = cfg.max_steps or engine.cfg.max_steps
    chains = [engine.new_chain(q) for q in questions]
    for c in chains:
        c.method = "tree-search"
        c.meta["tree_search"] = {"k": cfg.k, "max_steps": max_steps, "annotator": annotator.name}
        if cfg.final_k is not None:
            c.meta["tree_search"]["final_k"] = cfg.final_k
    frontier: list[tuple[Chain, str | None]] = [(c, None) for c in chains]
    for depth in range(max_steps):
        if not frontier:
            break
        last = depth + 1 == max_steps
        candidates = engine.sample_next_steps(frontier, cfg.final_k if last and cfg.final_k else cfg.k)
        groups = []
        for (chain, _), steps in zip(frontier, candidates):
            for s in steps:
                chain.add_step(s)
            groups.append((chain, steps))
        annotator.label_groups(groups)
        nxt = []
        for chain, steps in groups:
            best = max(steps, key=lambda s: s.labels[annotator.name].value)   # first of the best on ties
            chain.selected = best.id
            if best.action not in (ANSWER, INVALID) and depth + 1 < max_steps:
                nxt.append((chain, best.id))
        frontier = nxt
    if cfg.finish:
        finish_losers(chains, engine, annotator, max_steps)
    return chains


def finish_losers(chains: Sequence[Chain], engine, annotator, max_steps: int) -> None:
    """Continue every unfinished leaf off the best path (a losing search step below the step limit) one sampled
    step at a time until each ends; new steps are added to their tree and labelled (singleton sibling groups, so
    they never form step pairs)."""
    def depth(chain: Chain, step) -> int:
        return len(chain.path(step.id))

    best = {id(c): {s.id for s in c.path()} for c in chains}
    frontier = [(c, s.id) for c in chains for s in c.leaves()
                if s.id not in best[id(c)] and s.action not in (ANSWER, INVALID) and depth(c, s) < max_steps]
    while frontier:
        steps = engine.sample_next_steps(frontier, 1)
        groups = []
        for (chain, _), (s,) in zip(frontier, steps):
            chain.add_step(s)
            groups.append((chain, [s]))
        annotator.label_groups(groups)
        frontier = [(c, s.id) for c, (s,) in groups if s.action not in (ANSWER, INVALID) and depth(c, s) < max_steps]


def tree_search_to_file(questions: Sequence[Question], engine, annotator, out_path: str | Path,
                        cfg: TreeSearchConfig | None = None) -> Path:
    """Resumable tree search: each finished batch of questions is appended whole; done questions are skipped.
    Under a multi-process launch each rank searches its shard and rank 0 alone appends, in question order."""
    from tqdm.auto import tqdm

    from rag_dpo.distributed import is_main, run_sharded
    cfg = cfg or TreeSearchConfig()
    out_path = Path(out_path)
    done = done_question_ids(out_path)
    todo = [q for q in questions if q.id not in done]
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), unit="question", desc="tree search",
               disable=not cfg.progress or not is_main())

    def batches(items):
        for b in range(0, len(items), max(1, cfg.batch_questions)):
            yield tree_search(items[b:b + cfg.batch_questions], engine, annotator, cfg)

    def write(chains):
        append_chains(out_path, chains)
        bar.update(len(chains))
    try:
        run_sharded(todo, batches, write, stage="tree search", unit=max(1, cfg.batch_questions))
    finally:
        bar.close()
    return out_path
