"""The typed records that cross stage boundaries, and all chain JSONL reading/writing.

`Question`, `Passage` and `Corpus` come out of the data stage. The `Chain` is the one record that flows through
every later stage (agent -> annotate -> pairs -> train -> eval). A chain is a *tree* of steps for one question:
a plain rollout is a single path; the tree-search annotators add sibling steps sampled from the same prefix.
Each step points at its parent (None for a first step), so a path is recovered by walking parents, and the
chain's `selected` leaf names the path whose answer counts in eval.

Chains are stored as JSONL, one chain per line, with `"version": CHAIN_VERSION` on every line; readers refuse
other versions with a clear error rather than guessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from rag_dpo.errors import InputError
from rag_dpo.io import append_jsonl, atomic_write_text, iter_jsonl

CHAIN_VERSION = 1

# Step actions.
SEARCH, ANSWER, INVALID = "search", "answer", "invalid"


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]                      # every accepted alias; empty for unanswerable questions
    supporting_ids: list[str] = field(default_factory=list)   # passage ids in the corpus
    hops: int | None = None
    type: str | None = None                 # bridge/comparison/compositional/... as the dataset names it
    answerable: bool = True
    source: str = ""                        # file it was loaded from (for messages and manifests)


@dataclass
class Passage:
    id: str
    title: str
    text: str

    def render(self) -> str:
        return f"{self.title}: {self.text}" if self.title else self.text


class Corpus:
    """An ordered collection of passages with id lookup. Order is stable (indexes depend on it)."""

    def __init__(self, passages: Iterable[Passage], name: str = ""):
        self.passages: list[Passage] = list(passages)
        self.name = name
        self.index: dict[str, int] = {}
        for i, p in enumerate(self.passages):
            self.index.setdefault(p.id, i)

    def __len__(self) -> int:
        return len(self.passages)

    def __iter__(self) -> Iterator[Passage]:
        return iter(self.passages)

    def __contains__(self, pid: str) -> bool:
        return pid in self.index

    def __getitem__(self, pid: str) -> Passage:
        return self.passages[self.index[pid]]

    def get(self, pid: str) -> Passage | None:
        i = self.index.get(pid)
        return None if i is None else self.passages[i]

    def fingerprint(self) -> str:
        """Content hash: cache keys for indexes built on this corpus."""
        from rag_dpo.io import stable_hash
        return stable_hash([(p.id, p.title, p.text) for p in self.passages])


@dataclass
class Label:
    """One annotator's verdict on one step. `cost` counts what producing it spent (rollouts, generated_tokens,
    judge_calls), so step-level and outcome-level data can be compared at equal budget."""
    value: float
    good: bool
    annotator: str
    cost: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    id: str                                  # unique within the chain ("0", "1", "1.2", ...)
    parent: str | None                       # previous step on this path; None for a first step
    text: str                                # exactly what the policy generated for this step (tags included)
    action: str                              # SEARCH | ANSWER | INVALID
    query: str | None = None
    answer: str | None = None
    retrieved_ids: list[str] = field(default_factory=list)
    observation: str = ""                    # the <information>...</information> text the environment appended
    parse_error: str | None = None
    # Token spans [start, end) in the token sequence of this step's path as rendered by agent.protocol for the
    # chain's model: the policy's own text and the retrieved text (trainers mask the latter).
    policy_span: list[int] | None = None
    info_span: list[int] | None = None
    generated_tokens: int = 0
    labels: dict[str, Label] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Step":
        d = dict(d)
        labels = {k: Label(**v) for k, v in (d.pop("labels", None) or {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise KeyError(sorted(unknown)[0])
        return cls(**d, labels=labels)


@dataclass
class Chain:
    question_id: str
    question: str
    gold_answers: list[str] = field(default_factory=list)
    supporting_ids: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    selected: str | None = None              # id of the leaf whose path is "the" chain (eval uses its answer)
    model: str = ""
    retriever: str = ""
    method: str = "agent"                    # agent | direct | rag | iter-retgen | oracle | ...
    sampling: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- tree navigation -------------------------------------------------------------------------------
    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def children(self, parent: str | None) -> list[Step]:
        return [s for s in self.steps if s.parent == parent]

    def leaves(self) -> list[Step]:
        parents = {s.parent for s in self.steps}
        return [s for s in self.steps if s.id not in parents]

    def path(self, leaf: str | None = None) -> list[Step]:
        """Steps from the root to `leaf` (default: the selected leaf, else the last step added)."""
        if not self.steps:
            return []
        leaf = leaf or self.selected or self.steps[-1].id
        by_id = {s.id: s for s in self.steps}
        out, cur = [], by_id[leaf]
        while cur is not None:
            out.append(cur)
            cur = by_id[cur.parent] if cur.parent is not None else None
        return out[::-1]

    def prefix(self, step_id: str) -> list[Step]:
        """The steps before `step_id` on its path (the context its siblings share)."""
        return self.path(step_id)[:-1]

    def add_step(self, step: Step) -> Step:
        if any(s.id == step.id for s in self.steps):
            raise ValueError(f"duplicate step id {step.id}")
        self.steps.append(step)
        return step

    def new_step_id(self) -> str:
        return str(len(self.steps))

    @property
    def final_answer(self) -> str | None:
        path = self.path()
        return path[-1].answer if path and path[-1].action == ANSWER else None

    # ---- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["steps"] = [s.to_dict() for s in self.steps]
        return {"version": CHAIN_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, file: str | None = None, line: int | None = None) -> "Chain":
        version = d.get("version")
        if version != CHAIN_VERSION:
            raise InputError(f"chain version {version!r} is not supported (expected {CHAIN_VERSION})",
                             file=file, line=line, field="version")
        d = {k: v for k, v in d.items() if k != "version"}
        for req in ("question_id", "question"):
            if req not in d:
                raise InputError("missing required field", file=file, line=line, field=req)
        steps = []
        for j, s in enumerate(d.pop("steps", []) or []):
            try:
                steps.append(Step.from_dict(s))
            except KeyError as e:
                raise InputError(f"step {j}: unknown field", file=file, line=line, field=str(e.args[0])) from None
            except TypeError as e:
                raise InputError(f"step {j}: {e}", file=file, line=line, field="steps") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError("unknown field", file=file, line=line, field=sorted(unknown)[0])
        return cls(**d, steps=steps)


def read_chains(path: str | Path, tolerate_torn_tail: bool = False) -> list[Chain]:
    return [Chain.from_dict(obj, file=str(path), line=i)
            for i, obj in iter_jsonl(path, tolerate_torn_tail=tolerate_torn_tail)]


def append_chains(path: str | Path, chains: Iterable[Chain]) -> None:
    append_jsonl(path, [c.to_dict() for c in chains])


def write_chains(path: str | Path, chains: Iterable[Chain]) -> None:
    import json
    atomic_write_text(path, "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in chains))


def done_question_ids(path: str | Path) -> set[str]:
    """Question ids already present in a (possibly interrupted) chains file: what a resumed stage skips."""
    from rag_dpo.io import repair_jsonl
    path = Path(path)
    if not path.exists():
        return set()
    repair_jsonl(path)
    return {obj["question_id"] for _, obj in iter_jsonl(path) if "question_id" in obj}
