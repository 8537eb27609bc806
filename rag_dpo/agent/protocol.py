"""The search-agent protocol: one tag format, and the one way a chain is rendered into tokens.

The policy writes `<think>...</think>` and then either `<search>query</search>` or `<answer>...</answer>`; the
environment appends `<information>...</information>` with the top-k passages. Everything is one assistant turn
(Search-R1 style), so a path renders as

    prompt | step 0 text | observation 0 | step 1 text | observation 1 | ... | answer step text + eos

`tokenize_path` tokenises each segment separately and concatenates, so the spans of policy text and of retrieved
text are exact by construction. Rollouts, annotators, pair builders and trainers all go through it: the masks the
trainers use are the spans the rollout engine recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from rag_dpo.records import ANSWER, INVALID, SEARCH, Passage, Step

SYSTEM_PROMPT = (
    "You answer multi-hop questions by searching a Wikipedia corpus. Think inside <think></think>. "
    "Then write <search>a search query</search> to retrieve passages, or <answer>a short answer</answer> "
    "when you know the answer. Retrieved passages are given inside <information></information>."
)

STOP_STRINGS = ["</search>", "</answer>"]

_TAG = re.compile(r"<(search|answer)>(.*?)</\1>", re.S)
_OPEN = re.compile(r"<(search|answer)>(.*)$", re.S)


@dataclass
class ParsedStep:
    action: str
    query: str | None = None
    answer: str | None = None
    error: str | None = None


def truncate_at_stop(text: str) -> str:
    """Cut generated text just after the first closing </search> or </answer> (the step boundary)."""
    cut = [text.find(s) + len(s) for s in STOP_STRINGS if s in text]
    return text[: min(cut)] if cut else text


def parse_step(text: str) -> ParsedStep:
    """Parse one generated step. Never raises: output that does not parse becomes an INVALID step with a reason."""
    text = truncate_at_stop(text)
    m = _TAG.search(text)
    if m is None:
        if _OPEN.search(text):
            return ParsedStep(INVALID, error="unclosed <search>/<answer> tag")
        return ParsedStep(INVALID, error="no <search> or <answer> tag")
    kind, body = m.group(1), " ".join(m.group(2).split())
    if not body:
        return ParsedStep(INVALID, error=f"empty <{kind}>")
    if kind == "search":
        return ParsedStep(SEARCH, query=body)
    return ParsedStep(ANSWER, answer=body)


def format_step(think: str, action: str, content: str) -> str:
    """Render a step the way the policy is trained to write it (used by oracle chains and tests)."""
    tag = "search" if action == SEARCH else "answer"
    return f"<think>{think}</think>\n<{tag}>{content}</{tag}>"


def format_observation(passages: Sequence[Passage], tokenizer=None, max_tokens_per_passage: int = 64) -> str:
    """The environment's reply: numbered passages (title + text), each cut to a token budget."""
    lines = []
    for i, p in enumerate(passages, 1):
        text = p.text
        if tokenizer is not None and max_tokens_per_passage:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_tokens_per_passage:
                text = tokenizer.decode(ids[:max_tokens_per_passage]) + " ..."
        lines.append(f"[{i}] {p.title}: {text}")
    return "\n<information>\n" + "\n".join(lines) + "\n</information>\n"


def render_prompt(tokenizer, question: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    """Chat-formatted prompt ending where the assistant's turn begins."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": f"Question: {question}"}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\n\nQuestion: {question}\nAssistant: "


def ends_turn(step: Step) -> bool:
    """Whether the policy's turn ends after this step, i.e. whether EOS follows it in training: only an answer.
    A search step is followed by retrieved text and an invalid step was cut off by the engine, so neither may
    teach the policy to emit EOS (an invalid `<answer></answer>` ends with the answer tag but is not an answer)."""
    return step.action == ANSWER


def step_segments(steps: Sequence[Step], eos: str | None) -> list[tuple[str, str]]:
    """(kind, text) segments after the prompt: 'policy' for generated text, 'info' for retrieved text."""
    segs: list[tuple[str, str]] = []
    for s in steps:
        text = s.text + (eos if (ends_turn(s) and eos) else "")
        segs.append(("policy", text))
        if s.observation:
            segs.append(("info", s.observation))
    return segs


@dataclass
class TokenizedPath:
    input_ids: list[int]
    policy_mask: list[int]          # 1 on tokens the policy wrote (training targets), 0 on prompt and retrieved text
    prompt_len: int
    step_spans: list[tuple[int, int]]        # policy span of each step
    info_spans: list[tuple[int, int] | None]  # retrieved-text span after each step (None for answer steps)


def tokenize_path(tokenizer, question: str, steps: Sequence[Step], system_prompt: str = SYSTEM_PROMPT,
                  add_eos: bool = True) -> TokenizedPath:
    """Token ids, policy mask and per-step spans of one root-to-step path (segment-wise tokenisation)."""
    prompt_ids = tokenizer(render_prompt(tokenizer, question, system_prompt), add_special_tokens=False)["input_ids"]
    ids, mask = list(prompt_ids), [0] * len(prompt_ids)
    step_spans, info_spans = [], []
    eos = tokenizer.eos_token if add_eos else None
    for s in steps:
        text = s.text + (eos if (ends_turn(s) and eos) else "")
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        step_spans.append((len(ids), len(ids) + len(t)))
        ids += t
        mask += [1] * len(t)
        if s.observation:
            o = tokenizer(s.observation, add_special_tokens=False)["input_ids"]
            info_spans.append((len(ids), len(ids) + len(o)))
            ids += o
            mask += [0] * len(o)
        else:
            info_spans.append(None)
    return TokenizedPath(ids, mask, len(prompt_ids), step_spans, info_spans)


def render_context(tokenizer, question: str, steps: Sequence[Step], system_prompt: str = SYSTEM_PROMPT) -> str:
    """The text a policy continues from after `steps` (prompt + steps + observations), for prompts in pairs."""
    return render_prompt(tokenizer, question, system_prompt) + "".join(t for _, t in step_segments(steps, None))
