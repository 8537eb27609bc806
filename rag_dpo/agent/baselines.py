"""Retrieval baselines for the tables: `direct` (no retrieval), `rag` (retrieve on the question once, answer) and
`iter-retgen` (T rounds; each retrieves with the question plus the previous round's generation, then answers;
the last round's answer counts — Shao et al. 2023).

They share the agent's engine (model, tokenizer, retriever, corpus, sampling settings, batching), and return
`Chain`s with `method` set, so eval treats every method alike. The retrieval is recorded as a `search` step with
no generated text (query = what was retrieved with, `retrieved_ids`, `observation`), the generation as an
`answer` step. The passages go into the user message (a chat prompt, not the agent's one-turn protocol), so
baseline steps carry no token spans: they are eval records, not training data.

The prompt asks for `<answer>...</answer>`, but a plain reply is accepted as the answer (its first line), so a
baseline is not scored on tag discipline; the step's `parse_error` still records that the tag was missing.
`max_new_tokens` (default: the engine's per-step budget) caps each generated answer.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Sequence

from rag_dpo.agent import protocol
from rag_dpo.agent.rollout import RolloutEngine, row_seed
from rag_dpo.records import ANSWER, INVALID, SEARCH, Chain, Question, Step

BASELINE_PROMPT = ("Answer the question with a short answer of a few words, written inside <answer></answer>. "
                   "Use the passages when they are given.")

_LEAD = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:\-]?\s*", re.I)


def plain_answer(text: str) -> str:
    """A short answer from untagged text: the first non-empty line, without an 'Answer:' lead-in or tags."""
    text = re.sub(r"</?(think|answer|search)>", " ", text)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return _LEAD.sub("", line).strip().rstrip(".").strip()


def answer_step(step_id: str, parent: str | None, text: str, n_tokens: int) -> Step:
    """Parse a baseline generation: a tagged answer, else the plain reply (parse error recorded), else invalid."""
    parsed = protocol.parse_step(text)
    if parsed.action == ANSWER:
        return Step(step_id, parent, text, ANSWER, answer=parsed.answer, generated_tokens=n_tokens)
    plain = plain_answer(text)
    error = "no <answer> tag (plain reply taken as the answer)" if plain else (parsed.error or "empty reply")
    return Step(step_id, parent, text, ANSWER if plain else INVALID, answer=plain or None, parse_error=error,
                generated_tokens=n_tokens)


def _prompt_ids(engine: RolloutEngine, question: str, observation: str | None) -> list[int]:
    user = f"Question: {question}"
    if observation:
        user = f"Passages:{observation.replace('<information>', '').replace('</information>', '').rstrip()}\n\n{user}"
    messages = [{"role": "system", "content": BASELINE_PROMPT}, {"role": "user", "content": user}]
    tok = engine.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{BASELINE_PROMPT}\n\n{user}\nAssistant: "
    return tok(text, add_special_tokens=False)["input_ids"]


def _chain(engine: RolloutEngine, q: Question, method: str) -> Chain:
    c = engine.new_chain(q)
    c.method = method
    return c


def _answer_round(engine: RolloutEngine, chains: list[Chain], observations: list[str | None], tag: str,
                  max_new_tokens: int | None) -> None:
    """One batched generation per chain, appended as an answer step."""
    contexts = [_prompt_ids(engine, c.question, o) for c, o in zip(chains, observations)]
    seeds = [row_seed(engine.cfg.seed, c.question_id, f"{c.method}:{tag}") for c in chains]
    for c, (text, n) in zip(chains, engine.generate_texts(contexts, seeds, engine.cfg.do_sample,
                                                         max_new_tokens)):
        parent = c.steps[-1].id if c.steps else None
        c.add_step(answer_step(str(len(c.steps)), parent, text, n))


def _retrieve_round(engine: RolloutEngine, chains: list[Chain], queries: list[str]) -> list[str]:
    steps = []
    for c, query in zip(chains, queries):
        parent = c.steps[-1].id if c.steps else None
        steps.append(c.add_step(Step(str(len(c.steps)), parent, "", SEARCH, query=query)))
    engine.observe(steps)
    return [s.observation for s in steps]


def _finish(chains: list[Chain], t0: float) -> list[Chain]:
    per = (time.perf_counter() - t0) / max(1, len(chains))
    for c in chains:
        c.selected = c.steps[-1].id
        c.meta["seconds"] = per
    return chains


def direct(engine: RolloutEngine, questions: Sequence[Question], max_new_tokens: int | None = None) -> list[Chain]:
    """Answer from the model's own knowledge, no retrieval."""
    t0 = time.perf_counter()
    chains = [_chain(engine, q, "direct") for q in questions]
    _answer_round(engine, chains, [None] * len(chains), "0", max_new_tokens)
    return _finish(chains, t0)


def rag(engine: RolloutEngine, questions: Sequence[Question], max_new_tokens: int | None = None) -> list[Chain]:
    """Retrieve k passages with the question, then answer from them."""
    t0 = time.perf_counter()
    chains = [_chain(engine, q, "rag") for q in questions]
    obs = _retrieve_round(engine, chains, [c.question for c in chains])
    _answer_round(engine, chains, obs, "0", max_new_tokens)
    return _finish(chains, t0)


def iter_retgen(engine: RolloutEngine, questions: Sequence[Question], rounds: int = 2,
                max_new_tokens: int | None = None) -> list[Chain]:
    """ITER-RETGEN: each round retrieves with the question plus the previous round's generation and answers."""
    t0 = time.perf_counter()
    chains = [_chain(engine, q, "iter-retgen") for q in questions]
    previous = [""] * len(chains)
    for t in range(max(1, rounds)):
        queries = [f"{c.question} {p}".strip() for c, p in zip(chains, previous)]
        obs = _retrieve_round(engine, chains, queries)
        _answer_round(engine, chains, obs, str(t), max_new_tokens)
        previous = [" ".join(re.sub(r"</?\w+>", " ", c.steps[-1].text).split()) for c in chains]
    for c in chains:
        c.meta["rounds"] = max(1, rounds)
    return _finish(chains, t0)


BASELINES: dict[str, Callable[..., list[Chain]]] = {"direct": direct, "rag": rag, "iter-retgen": iter_retgen}
