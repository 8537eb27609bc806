"""Verified write-back (bidirectional RAG): answers the agent produced become passages of a *copy* of the corpus,
but only when three checks pass, and each written passage can be taken out again.

A `Candidate` is one answer with the passages it cites and the passages its chain retrieved. `WritebackStore`
holds the original `Corpus` (never modified, its file never opened for writing) plus an overlay of written
passages, and serves a retriever over both. `store.write(candidates)` runs the checks and adds what passes:

- attribution: every cited passage was retrieved somewhere on the chain's path (the answer rests on evidence the
  agent saw, not on a passage it never read);
- entailment: a judge scores P(the cited passages support "question -> answer") and it must reach a threshold;
- novelty: the new passage's token Jaccard similarity to every passage already in the overlay corpus (original
  and written) stays below a threshold (no near-duplicates, e.g. the same sub-question answered twice).

Design decisions:
- Citations are post hoc (`store.cite`): the policy writes no citations, so the passages a claim cites are the top
  `cite_k` original passages the retriever returns for "question answer". That makes attribution a real check: when
  the best evidence for the claim is a passage the agent never retrieved, the answer was not read off the passages.
- Judges: no PyPI package ships NLI weights that install offline in a safe format (the NLI packages found download
  a cross-encoder from a hub at run time, or ship a pickled bag-of-words model), so the entailment judge is the
  policy itself, in two forms: `PolicyJudge` (P(yes) / (P(yes) + P(no)) of the next token after a yes/no support
  prompt) and `ReaderJudge` (the policy answers from the cited passages alone; F1 against the candidate). A lexical
  check (`OverlapJudge`: share of the answer's words, outside the question's, found in the cited passages) is
  cheap and deterministic; `MinJudge` joins judges that must all pass. docs/variants.md has what each kept out on
  MuSiQue (the yes/no judge passed everything). Judges are plain callables, so tests use a stub.
- Every check's score is recorded for every candidate, also for checks that were not enforced, so one run tells
  what each check would have kept out (`Verdict.passed` vs `Verdict.accepted`).
- Each written passage records its source (question id, chain hash, answer step id, question, answer, cited and
  retrieved ids, check scores); `remove(id)` takes it out again. The overlay corpus is the original passages in
  their order followed by the written ones in write order, and the index is rebuilt from it (BM25: rebuilt, under
  a second at this size; dense: the original embeddings plus one row per written passage, exact), so after a
  removal the corpus, and therefore every search result, is what it was before the write.
- Overlay indexes are never written to the on-disk index cache (each write would leave a new folder behind); the
  original corpus' index is built (and cached) as usual. The overlay itself can be persisted to a JSONL file of
  its own (`path`), rewritten atomically after each change, so a killed run resumes with its written passages.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rag_dpo.errors import InputError
from rag_dpo.io import atomic_write_text, iter_jsonl, stable_hash
from rag_dpo.records import Chain, Corpus, Passage
from rag_dpo.retrieval.base import Hits, index_text

CHECKS = ("attribution", "entailment", "novelty")
WRITTEN_PREFIX = "wb:"
OVERLAY_VERSION = 1


@dataclass
class WritebackConfig:
    """Which checks are enforced and their thresholds."""
    checks: list[str] = field(default_factory=lambda: list(CHECKS))   # enforced checks (all are always scored)
    entail_threshold: float = 0.5       # judge score at or above which the cited passages support the answer
    novelty_threshold: float = 0.6      # token Jaccard at or above which a passage is a near-duplicate
    cite_k: int = 1                     # passages a claim cites (post-hoc citation, `WritebackStore.cite`)

    def __post_init__(self):
        unknown = [c for c in self.checks if c not in CHECKS]
        if unknown:
            raise InputError(f"unknown write-back check {unknown[0]!r} (choose from {', '.join(CHECKS)})",
                             field="checks")


@dataclass
class Candidate:
    """One answer offered for write-back: the claim, what it cites and what its chain retrieved."""
    question: str
    answer: str
    cited_ids: list[str]
    retrieved_ids: list[str]
    source: dict = field(default_factory=dict)   # question_id, chain_hash, step_id (+ whatever the caller adds)


@dataclass
class Verdict:
    """Scores of every check, which passed, and whether the passage was written (all *enforced* checks passed)."""
    candidate: Candidate
    scores: dict            # attribution (0/1), entailment (judge score), novelty (max Jaccard), nearest (id)
    passed: dict            # check -> bool, for every check
    accepted: bool
    passage_id: str | None = None

    def failed(self) -> list[str]:
        return [c for c in CHECKS if not self.passed[c]]


def chain_hash(chain: Chain) -> str:
    """Identifies a chain by what it did: its question and the text and retrieved ids of its selected path."""
    return stable_hash([chain.question_id, chain.question,
                        [(s.id, s.text, s.retrieved_ids) for s in chain.path()]])


def candidate_from_chain(chain: Chain, cited_ids: Sequence[str] = ()) -> Candidate | None:
    """The chain's final answer as a candidate (None when the chain did not answer)."""
    path = chain.path()
    answer = chain.final_answer
    if not answer or not answer.strip():
        return None
    retrieved = list(dict.fromkeys(pid for s in path for pid in s.retrieved_ids))
    return Candidate(question=chain.question, answer=answer.strip(), cited_ids=list(cited_ids),
                     retrieved_ids=retrieved,
                     source={"question_id": chain.question_id, "chain_hash": chain_hash(chain),
                             "step_id": path[-1].id})


def claim_text(question: str, answer: str) -> str:
    return f"Question: {' '.join(question.split())} Answer: {' '.join(answer.split())}"


def written_passage(candidate: Candidate) -> Passage:
    """The passage a candidate becomes: titled by the answer (corpus titles name entities, and the answer is the
    entity a later question needs), text = the question and its answer."""
    text = claim_text(candidate.question, candidate.answer)
    return Passage(f"{WRITTEN_PREFIX}{stable_hash(text, 12)}", candidate.answer, text)


# ---- judges -------------------------------------------------------------------------------------------------
Judge = Callable[[list[tuple[list[Passage], str, str]]], list[float]]
"""(cited passages, question, answer) per item -> support score in [0, 1] per item."""


def _passages_key(passages: list[Passage]) -> tuple:
    return tuple((p.id, p.text) for p in passages)


def _memoised(memo: dict, keys: list, items: list, compute: Callable[[list], list]) -> list:
    """Values for `keys` (one per item), computing only the items whose key is not in `memo`, each once. Why: a
    joined judge (`reader+overlap`) scores every candidate once for the record and again when the store enforces
    it; the second call must not generate again."""
    by_key = dict(zip(keys, items))
    missing = [k for k in by_key if k not in memo]
    if missing:
        memo.update(zip(missing, compute([by_key[k] for k in missing])))
    return [memo[k] for k in keys]


class OverlapJudge:
    """Lexical support: the share of the answer's (normalised) words that occur in the cited passages, counting only
    words the question does not already contain; an answer that only repeats the question scores 0 (the agent's
    commonest wrong answer is the question's own subject, which every cited passage mentions)."""

    name = "overlap"

    def __call__(self, items: list[tuple[list[Passage], str, str]]) -> list[float]:
        from rag_dpo.metrics import normalize_answer
        out = []
        for passages, question, answer in items:
            asked = set(normalize_answer(question).split())
            words = [w for w in normalize_answer(answer).split() if w not in asked]
            seen = set(normalize_answer(" ".join(index_text(p) for p in passages)).split())
            out.append(sum(w in seen for w in words) / len(words) if words else 0.0)
        return out


class ReaderJudge:
    """Answer agreement (a question-answering consistency check): the policy reads only the cited passages and
    answers the question greedily; the score is the token F1 of its answer against the candidate's. A claim the
    cited passages entail is what a reader of those passages answers.

    render: (passages, question) -> the text the policy continues with its answer (the eval stage passes the
    agent protocol's rendering, which this stage cannot import). max_new_tokens: the reader's answer budget.
    """

    name = "reader"

    def __init__(self, model, tokenizer, render: Callable[[list[Passage], str], str], max_new_tokens: int = 24,
                 batch_size: int = 8, stop: str = "</answer>"):
        self.model, self.tokenizer, self.render = model, tokenizer, render
        self.max_new_tokens, self.batch_size, self.stop = max_new_tokens, batch_size, stop
        self.answers: list[str] = []          # the reader's answers of the last call (for reports)
        self._read: dict = {}                 # (passages, question) -> answer: it does not depend on the claim

    def read(self, items: list[tuple[list[Passage], str, str]]) -> list[str]:
        keys = [(_passages_key(passages), question) for passages, question, _ in items]
        return _memoised(self._read, keys, items, self._generate)

    def _generate(self, items: list[tuple[list[Passage], str, str]]) -> list[str]:
        import torch
        texts = [self.render(passages, question) for passages, question, _ in items]
        out: list[str] = []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            for b in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[b:b + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.model.device)
                with torch.no_grad():
                    gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                              pad_token_id=self.tokenizer.pad_token_id, stop_strings=[self.stop],
                                              tokenizer=self.tokenizer)
                for row in gen[:, enc["input_ids"].shape[1]:]:
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    out.append(" ".join(text.split(self.stop)[0].split()))
        finally:
            self.tokenizer.padding_side = side
        return out

    def __call__(self, items: list[tuple[list[Passage], str, str]]) -> list[float]:
        from rag_dpo.metrics import f1_score
        self.answers = self.read(items)
        return [f1_score(read, [answer]) for read, (_, _, answer) in zip(self.answers, items)]


class MinJudge:
    """Several judges that must all agree: the lowest of their scores."""

    def __init__(self, *judges):
        self.judges = judges
        self.name = "+".join(getattr(j, "name", type(j).__name__) for j in judges)

    def __call__(self, items: list[tuple[list[Passage], str, str]]) -> list[float]:
        scores = [j(items) for j in self.judges]
        return [min(col) for col in zip(*scores)]


JUDGE_PROMPT = ("Passages:\n{passages}\n\nQuestion: {question}\nProposed answer: {answer}\n\n"
                "Do the passages state that the proposed answer is the answer to the question? Reply yes or no.")


class PolicyJudge:
    """The policy as entailment judge: P(yes) / (P(yes) + P(no)) for the first token of its reply to a yes/no
    support prompt (chat-formatted; yes/no in every capitalisation and with or without a leading space).

    max_passage_tokens: each cited passage is cut to this many tokens (keeps prompts short on a CPU).
    batch_size: prompts per forward pass.
    """

    name = "policy"

    def __init__(self, model, tokenizer, batch_size: int = 8, max_passage_tokens: int = 128):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_passage_tokens = batch_size, max_passage_tokens
        self.yes, self.no = self._word_ids(("yes", "Yes", "YES")), self._word_ids(("no", "No", "NO"))
        if not self.yes or not self.no:
            raise InputError("the judge's tokenizer has no single token for yes/no", field="judge")
        self._scores: dict = {}

    def _word_ids(self, words) -> list[int]:
        ids = set()
        for w in words:
            for variant in (w, " " + w):
                t = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
                if len(t) == 1:
                    ids.add(t[0])
        return sorted(ids)

    def _cut(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_passage_tokens else self.tokenizer.decode(ids[:self.max_passage_tokens])

    def prompt(self, passages: list[Passage], question: str, answer: str) -> str:
        shown = "\n".join(f"[{i}] {p.title}: {self._cut(p.text)}" for i, p in enumerate(passages, 1)) or "(none)"
        user = JUDGE_PROMPT.format(passages=shown, question=question, answer=answer)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{user}\nAnswer: "

    def __call__(self, items: list[tuple[list[Passage], str, str]]) -> list[float]:
        keys = [(_passages_key(passages), question, answer) for passages, question, answer in items]
        return _memoised(self._scores, keys, items, self._score)

    def _score(self, items: list[tuple[list[Passage], str, str]]) -> list[float]:
        import torch
        prompts = [self.prompt(*item) for item in items]
        out: list[float] = []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"       # the next-token logits sit at the last position of every row
        try:
            for b in range(0, len(prompts), self.batch_size):
                enc = self.tokenizer(prompts[b:b + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.model.device)
                with torch.no_grad():
                    logits = self.model(**enc).logits[:, -1, :].float()
                probs = torch.softmax(logits, dim=-1)
                p_yes, p_no = probs[:, self.yes].sum(-1), probs[:, self.no].sum(-1)
                out.extend((p_yes / (p_yes + p_no).clamp_min(1e-12)).tolist())
        finally:
            self.tokenizer.padding_side = side
        return out


# ---- novelty ------------------------------------------------------------------------------------------------
def _tokens(text: str, stop: frozenset[str]) -> frozenset[str]:
    from rag_dpo.retrieval.bm25 import tokenize
    return frozenset(tokenize(text, stop))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


# ---- the store ----------------------------------------------------------------------------------------------
@dataclass
class Written:
    passage: Passage
    source: dict
    scores: dict


class WritebackStore:
    """The original corpus plus verified written passages, with a retriever over both.

    corpus: the original corpus (left untouched). retriever: a name `build_retriever` takes (its index over the
    original corpus is built once; overlays are rebuilt from it, see the module docstring). judge: an entailment
    judge (`Judge`). cfg: checks and thresholds. path: optional JSONL file that persists the written passages
    (loaded when it exists, rewritten atomically after each change). base_retriever: an already built retriever
    `retriever` over `corpus` to reuse (several stores over one corpus share its index). retriever_opts: the
    retriever's options.
    """

    def __init__(self, corpus: Corpus, retriever: str = "bm25", judge: Judge | None = None,
                 cfg: WritebackConfig | None = None, path: str | Path | None = None, base_retriever=None,
                 **retriever_opts):
        from rag_dpo.retrieval import build_retriever
        from rag_dpo.retrieval.bm25 import stopword_set

        self.base = corpus
        self.cfg = cfg or WritebackConfig()
        self.judge = judge if judge is not None else OverlapJudge()
        self.retriever_name, self.retriever_opts = retriever, dict(retriever_opts)
        self.base_retriever = base_retriever or build_retriever(retriever, corpus, **retriever_opts)
        self.path = Path(path) if path is not None else None
        self.written: list[Written] = []
        self._stop = stopword_set("en")
        self._base_tokens = [_tokens(index_text(p), self._stop) for p in corpus]
        self._dense_rows: dict[str, object] = {}     # written id -> its embedding row (dense retrievers)
        self._corpus: Corpus = corpus
        self._retriever = self.base_retriever
        if self.path is not None and self.path.exists():
            self._load()

    # ---- the overlay corpus and its retriever -----------------------------------------------------------
    @property
    def corpus(self) -> Corpus:
        """Original passages in their order, then written passages in write order."""
        return self._corpus

    @property
    def retriever(self):
        if self._retriever is None:
            self._retriever = self._build_retriever()
        return self._retriever

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        return self.retriever.search(list(queries), k)

    def _changed(self, save: bool = True) -> None:
        self._corpus = (self.base if not self.written else
                        Corpus(list(self.base) + [w.passage for w in self.written], name=f"{self.base.name}+written"))
        self._retriever = None if self.written else self.base_retriever
        if save and self.path is not None:
            self._save()

    def _build_retriever(self):
        from rag_dpo.retrieval import build_retriever
        from rag_dpo.retrieval.dense import DenseRetriever
        from rag_dpo.retrieval.hybrid import HybridRetriever

        base, corpus = self.base_retriever, self._corpus
        if isinstance(base, DenseRetriever):
            return self._dense_overlay(base, corpus)
        if isinstance(base, HybridRetriever):
            r = copy.copy(base)
            r.corpus, r.ids = corpus, [p.id for p in corpus]
            r.lexical = build_retriever("bm25s", corpus, cache=False, show_progress=False,
                                        **{k: v for k, v in base.lexical.settings().items()})
            r.dense = self._dense_overlay(base.dense, corpus)
            return r
        opts = {**self.retriever_opts, "cache": False, "show_progress": False}
        return build_retriever(self.retriever_name, corpus, **opts)

    def _dense_overlay(self, base, corpus: Corpus):
        """The original embeddings plus one row per written passage (rows are independent, so this is exact)."""
        import numpy as np
        new = [w.passage for w in self.written if w.passage.id not in self._dense_rows]
        if new:
            emb = base.encoder.encode_document([index_text(p) for p in new], normalize_embeddings=True,
                                               convert_to_numpy=True, show_progress_bar=False)
            for p, row in zip(new, np.asarray(emb, dtype=np.float32)):
                self._dense_rows[p.id] = row
        r = copy.copy(base)
        r.corpus, r.ids = corpus, [p.id for p in corpus]
        r.embeddings = np.ascontiguousarray(np.vstack([base.embeddings] +
                                                      [self._dense_rows[w.passage.id][None] for w in self.written]))
        return r

    # ---- checks -----------------------------------------------------------------------------------------
    def cite(self, claims: Sequence[tuple[str, str]], k: int | None = None) -> list[list[str]]:
        """Post-hoc citations: the top k *original* passages for "question answer", per claim. Written passages
        are claims, not evidence: a claim verified against another claim would let one wrong write-back vouch
        for the next (a hop's question names the previous hop's answer, whose written passage it matches best)."""
        k = k or self.cfg.cite_k
        if not claims:
            return []
        hits = self.base_retriever.search([f"{q} {a}" for q, a in claims], k)
        return [[pid for pid, _ in h] for h in hits]

    def novelty(self, passage: Passage, extra: Sequence[Passage] = ()) -> tuple[float, str | None]:
        """(highest token Jaccard to a passage of the overlay corpus or of `extra`, that passage's id)."""
        mine = _tokens(index_text(passage), self._stop)
        best, nearest = 0.0, None
        pool = [(p.id, t) for p, t in zip(self.base, self._base_tokens)]
        pool += [(p.id, _tokens(index_text(p), self._stop)) for p in [w.passage for w in self.written] + list(extra)]
        for pid, toks in pool:
            s = jaccard(mine, toks)
            if s > best:
                best, nearest = s, pid
        return best, nearest

    def verify(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        """Score every check for every candidate without writing (novelty against the current overlay only)."""
        return self._judge_all(candidates, write=False)

    def write(self, candidates: Sequence[Candidate]) -> list[Verdict]:
        """Check the candidates and add those that pass every enforced check, in order (a candidate is also
        checked for novelty against those accepted before it in the same call)."""
        return self._judge_all(candidates, write=True)

    def _judge_all(self, candidates: Sequence[Candidate], write: bool) -> list[Verdict]:
        candidates = list(candidates)
        cited = [[self.corpus.get(pid) for pid in c.cited_ids] for c in candidates]
        judged = [i for i, ps in enumerate(cited) if ps and all(p is not None for p in ps)]
        scores = self.judge([(cited[i], candidates[i].question, candidates[i].answer) for i in judged]) \
            if judged else []
        entail = dict(zip(judged, (float(s) for s in scores)))
        verdicts, accepted = [], []
        for i, c in enumerate(candidates):
            passage = written_passage(c)
            attributed = bool(c.cited_ids) and set(c.cited_ids) <= set(c.retrieved_ids)
            similarity, nearest = self.novelty(passage, accepted)
            s = {"attribution": float(attributed), "entailment": entail.get(i, 0.0), "novelty": similarity,
                 "nearest": nearest}
            taken = passage.id in self.corpus or any(p.id == passage.id for p in accepted)
            passed = {"attribution": attributed, "entailment": s["entailment"] >= self.cfg.entail_threshold,
                      "novelty": similarity < self.cfg.novelty_threshold and not taken}
            ok = all(passed[name] for name in self.cfg.checks) and not taken   # one id, one passage
            v = Verdict(c, s, passed, ok, passage.id if ok else None)
            if ok:
                accepted.append(passage)
                if write:
                    self.written.append(Written(passage, {**c.source, "question": c.question, "answer": c.answer,
                                                          "cited_ids": list(c.cited_ids),
                                                          "retrieved_ids": list(c.retrieved_ids)}, s))
            verdicts.append(v)
        if write and accepted:
            self._changed()
        if not write:
            for v in verdicts:
                v.accepted, v.passage_id = False, None
        return verdicts

    # ---- provenance and removal -------------------------------------------------------------------------
    def source(self, passage_id: str) -> dict:
        """The source chain of a written passage (question id, chain hash, step id, question, answer, citations)."""
        for w in self.written:
            if w.passage.id == passage_id:
                return w.source
        raise KeyError(passage_id)

    def remove(self, passage_id: str) -> Passage:
        """Take a written passage out again (original passages cannot be removed)."""
        for i, w in enumerate(self.written):
            if w.passage.id == passage_id:
                del self.written[i]
                self._dense_rows.pop(passage_id, None)
                self._changed()
                return w.passage
        if passage_id in self.base:
            raise InputError(f"passage {passage_id!r} belongs to the original corpus; only written passages can be "
                             "removed", field="passage_id")
        raise KeyError(passage_id)

    def remove_from(self, question_id: str) -> list[Passage]:
        """Remove every passage written from one question's chains."""
        ids = [w.passage.id for w in self.written if w.source.get("question_id") == question_id]
        return [self.remove(pid) for pid in ids]

    def written_rows(self) -> list[dict]:
        return [{"version": OVERLAY_VERSION, **asdict(w.passage), "source": w.source, "scores": w.scores}
                for w in self.written]

    def _save(self) -> None:
        import json
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.written_rows()))

    def _load(self) -> None:
        for line, obj in iter_jsonl(self.path):
            if obj.get("version") != OVERLAY_VERSION:
                raise InputError(f"overlay version {obj.get('version')!r} is not supported (expected "
                                 f"{OVERLAY_VERSION})", file=str(self.path), line=line, field="version")
            try:
                p = Passage(str(obj["id"]), str(obj["title"]), str(obj["text"]))
                w = Written(p, dict(obj["source"]), dict(obj.get("scores") or {}))
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"bad written passage: {e}", file=str(self.path), line=line,
                                 field=str(e.args[0]) if isinstance(e, KeyError) else "id") from None
            if p.id in self.base or any(x.passage.id == p.id for x in self.written):
                raise InputError(f"written passage id {p.id!r} is already in the corpus", file=str(self.path),
                                 line=line, field="id")
            self.written.append(w)
        self._changed(save=False)
