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

`shots` puts that many worked examples (`DEMONSTRATIONS`, hand-written, from no dataset) before the question as
earlier chat turns. Why: a model never trained on the answer format (the base model) otherwise replies in whole
sentences ("The population of X was 273."), and the baseline measures the format instead of the method: the bundled
SmolLM2's RAG baseline had EM 0.006 with the gold answer inside its reply on 24 % of the test questions.
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

# (passages as the engine formats them, question, answer): about nothing in the bundled data; entity answers,
# since a year in an example made the base model answer years (EM 0.05, answer in the reply 0.13 on 40 questions)
DEMONSTRATIONS = [
    ("\n[1] Mount Everest: Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur "
     "Himal sub-range of the Himalayas.\n[2] K2: K2 is the second-highest mountain on Earth.\n",
     "In which mountain range is Earth's highest mountain?", "the Himalayas"),
    ("\n[1] Pride and Prejudice: Pride and Prejudice is an 1813 novel of manners by Jane Austen; its hero is Mr. "
     "Darcy.\n[2] Jane Austen: Jane Austen (16 December 1775 - 18 July 1817) was an English novelist.\n",
     "Which novelist wrote the book whose hero is Mr. Darcy?", "Jane Austen"),
]

# Worked examples a baseline gets when it runs on a model never trained on the answer format (the compare's `base`
# row, `make eval` without a run): without them the bundled SmolLM2 answers in sentences (RAG on the 161 test
# questions: EM 0.006, the gold answer inside its reply 24 %); with these two, EM 0.062. The warm start needs none.
BASE_MODEL_SHOTS = 2

_LEAD = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is)?\s*[:\-]?\s*", re.I)
_MARK = re.compile(r"^(?:\[\d+\]|\d+[.)]|[-*\u2022])\s+")     # "[4] ", "1. ", "- ": a list or passage mark


def plain_answer(text: str) -> str:
    """A short answer from untagged text: the first line with something after its 'Answer:' lead-in (a reply
    "The answer is:" then the answer on the next line), without tags or a leading list mark."""
    text = re.sub(r"</?(think|answer|search)>", " ", text)
    for line in text.splitlines():
        answer = _MARK.sub("", _LEAD.sub("", line.strip())).strip().rstrip(".").strip()
        if answer:
            return answer
    return ""


def answer_step(step_id: str, parent: str | None, text: str, n_tokens: int) -> Step:
    """Parse a baseline generation: a tagged answer, else the plain reply (parse error recorded), else invalid."""
    parsed = protocol.parse_step(text)
    if parsed.action == ANSWER:
        return Step(step_id, parent, text, ANSWER, answer=parsed.answer, generated_tokens=n_tokens)
    plain = plain_answer(text)
    error = "no <answer> tag (plain reply taken as the answer)" if plain else (parsed.error or "empty reply")
    return Step(step_id, parent, text, ANSWER if plain else INVALID, answer=plain or None, parse_error=error,
                generated_tokens=n_tokens)


def _user(question: str, observation: str | None) -> str:
    user = f"Question: {question}"
    if observation:
        user = f"Passages:{observation.replace('<information>', '').replace('</information>', '').rstrip()}\n\n{user}"
    return user


def _prompt_ids(engine: RolloutEngine, question: str, observation: str | None, shots: int = 0) -> list[int]:
    """The chat prompt: system, `shots` worked examples (with passages when this question has them), question."""
    messages = [{"role": "system", "content": BASELINE_PROMPT}]
    for passages, q, a in DEMONSTRATIONS[:shots]:
        messages += [{"role": "user", "content": _user(q, passages if observation is not None else None)},
                     {"role": "assistant", "content": f"<answer>{a}</answer>"}]
    messages.append({"role": "user", "content": _user(question, observation)})
    tok = engine.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join([BASELINE_PROMPT] + [m["content"] if m["role"] == "user" else f"Assistant: {m['content']}"
                                                  for m in messages[1:]]) + "\nAssistant: "
    return tok(text, add_special_tokens=False)["input_ids"]


def _chain(engine: RolloutEngine, q: Question, method: str) -> Chain:
    c = engine.new_chain(q)
    c.method = method
    return c


def _answer_round(engine: RolloutEngine, chains: list[Chain], observations: list[str | None], tag: str,
                  max_new_tokens: int | None, shots: int = 0) -> None:
    """One batched generation per chain, appended as an answer step."""
    contexts = [_prompt_ids(engine, c.question, o, shots) for c, o in zip(chains, observations)]
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


def direct(engine: RolloutEngine, questions: Sequence[Question], max_new_tokens: int | None = None,
           shots: int = 0) -> list[Chain]:
    """Answer from the model's own knowledge, no retrieval."""
    t0 = time.perf_counter()
    chains = [_chain(engine, q, "direct") for q in questions]
    _answer_round(engine, chains, [None] * len(chains), "0", max_new_tokens, shots)
    return _finish(chains, t0)


def rag(engine: RolloutEngine, questions: Sequence[Question], max_new_tokens: int | None = None,
        shots: int = 0) -> list[Chain]:
    """Retrieve k passages with the question, then answer from them."""
    t0 = time.perf_counter()
    chains = [_chain(engine, q, "rag") for q in questions]
    obs = _retrieve_round(engine, chains, [c.question for c in chains])
    _answer_round(engine, chains, obs, "0", max_new_tokens, shots)
    return _finish(chains, t0)


def iter_retgen(engine: RolloutEngine, questions: Sequence[Question], rounds: int = 2,
                max_new_tokens: int | None = None, shots: int = 0) -> list[Chain]:
    """ITER-RETGEN: each round retrieves with the question plus the previous round's generation and answers."""
    t0 = time.perf_counter()
    chains = [_chain(engine, q, "iter-retgen") for q in questions]
    previous = [""] * len(chains)
    for t in range(max(1, rounds)):
        queries = [f"{c.question} {p}".strip() for c, p in zip(chains, previous)]
        obs = _retrieve_round(engine, chains, queries)
        _answer_round(engine, chains, obs, str(t), max_new_tokens, shots)
        previous = [" ".join(re.sub(r"</?\w+>", " ", c.steps[-1].text).split()) for c in chains]
    for c in chains:
        c.meta["rounds"] = max(1, rounds)
    return _finish(chains, t0)


BASELINES: dict[str, Callable[..., list[Chain]]] = {"direct": direct, "rag": rag, "iter-retgen": iter_retgen}
