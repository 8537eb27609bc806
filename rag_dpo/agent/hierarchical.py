"""The planner / synthesizer agent (`agent-hier`): one role searches, a second role writes the answer.

The *planner* is the search agent of `agent.protocol` run by the rollout engine unchanged: it thinks (free to
break the question into sub-questions there), issues `<search>` queries, and decides that the evidence suffices
by writing its `<answer>` step, which here is only the "finish" signal. The *synthesizer* then writes the answer
from the question and the passages the planner retrieved, and from nothing else: its prompt (`synthesizer_prompt`,
its own system prompt, a chat turn like the `rag` baseline's) never holds the planner's thinking, queries,
sub-questions or own answer. Same model with two prompts by default; `synthesizer=` takes a second engine (e.g. a
second LoRA adapter of the same base loaded as its own policy). `hierarchical` = `engine.rollout` (the planner) +
`synthesize` (the answers, `SynthesizerConfig`); `synthesize` also turns existing planner chains (the flat agent's
greedy eval chains are exactly the planner's) into hierarchical ones, so synthesizer settings are compared on
the same planner chains.

Design decisions:
- The planner keeps the flat agent's prompt (`protocol.SYSTEM_PROMPT`), so its steps are exactly what
  `engine.rollout` writes, and the annotators, step pairs and trainers (which all render a path with
  `tokenize_path` and that prompt) see the planner's steps in the context they were generated in: step annotation
  and step-DPO apply to the planner with no change, and tree search / the rollout pool need no hierarchical mode.
- A hierarchical chain is a normal linear `Chain` (`method = "agent-hier"`): the planner's searches, then one
  answer step written by the synthesizer (the selected leaf), so eval, annotators and pair builders read it
  unchanged. The synthesizer's step replaces the planner's finish step; that step is kept whole in
  `chain.meta["planner_finish"]` (`planner_chain` restores the planner's own chain). Roles are recorded in
  `chain.meta["roles"]` (`{"planner": [step ids], "synthesizer": [step id]}`): `Step` has no role field and adding
  one would change every chain file; this is the documented convention.
- The synthesizer always answers, whether the planner finished, stopped at `max_steps` or wrote an unparsable step
  (then the synthesizer's step follows it, and eval still counts the parse error): the planner decides when to stop
  searching, the synthesizer owns every answer. `meta["planner_end"]` says which of the three happened, so the
  effect of "always answer" can be told apart from the effect of the split (docs/variants.md).
- The synthesizer sees the distinct passages retrieved on the planner's path, in retrieval order, each cut to the
  engine's `max_tokens_per_passage` (the same budget the planner saw).
- Its turn starts with `<answer>` already written (`answer_prefix`, part of the prompt; the step's text keeps it):
  its only job is the answer, and a policy fine-tuned on the search protocol otherwise often starts a new search
  instead (without the prefix the warm start did so in 12 of 40 test questions: docs/variants.md). A reply that
  still does not close the tag counts as the answer as written, with a parse error recorded (the `rag` baseline's
  rule, `baselines.answer_step`).
- Answer-level pairs for the synthesizer (`synthesizer_pairs`): n sampled synthesizer answers for one planner
  chain, the best and worst by answer F1 (margin, no near-duplicates), as TRL `{prompt, chosen, rejected}` rows
  with the step-pair columns (`pairs.builders`), so they can be saved and concatenated with step pairs and the DPO
  trainer consumes them unchanged.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Sequence

from rag_dpo.agent import protocol
from rag_dpo.agent.baselines import answer_step
from rag_dpo.agent.rollout import RolloutEngine, row_seed
from rag_dpo.metrics import f1_score, normalize_answer
from rag_dpo.records import ANSWER, Chain, Corpus, Passage, Question, Step

METHOD = "agent-hier"
VARIANTS = ("flat", "hierarchical")
SYNTHESIZER = "synthesizer"
PLANNER = "planner"

SYNTHESIZER_PROMPT = ("You write the final answer to a question using only the passages given. Answer with a short "
                      "answer of a few words, written inside <answer></answer>.")
ANSWER_PREFIX = "<answer>"
PROMPTS = ("chat", "protocol")


@dataclass
class SynthesizerConfig:
    """How the synthesizer is asked. `chat` (default) is its own role: SYNTHESIZER_PROMPT as the system message,
    passages and question as the user message. `protocol` renders the agent's own prompt for the question followed
    by one <information> block holding the passages (what a model fine-tuned on the search protocol has seen before
    an answer; still no planner text): an ablation of the prompt, not of the split."""
    answer_tokens: int = 32             # generation budget of the answer
    max_passages: int | None = None     # cap on the passages shown (None: every distinct one the planner retrieved)
    answer_prefix: str = ANSWER_PREFIX  # the reply starts with this (in the prompt; the step's text keeps it)
    prompt: str = "chat"                # chat | protocol


def variant_methods(methods: Sequence[str], variant: str) -> list[str]:
    """Eval methods for an agent variant: `hierarchical` evaluates `agent-hier` where `agent` is asked for, unless
    the list already names `agent-hier` (then both run, as listed)."""
    if variant not in VARIANTS:
        from rag_dpo.errors import InputError
        raise InputError(f"unknown agent variant {variant!r} (choose from {', '.join(VARIANTS)})",
                         field="agent.variant")
    if variant == "flat" or METHOD in methods:
        return list(methods)
    return list(dict.fromkeys(METHOD if m == "agent" else m for m in methods))


# ---- what each role sees ----------------------------------------------------------------------------------------
def is_hierarchical(chain: Chain) -> bool:
    return bool((chain.meta.get("roles") or {}).get(SYNTHESIZER))


def planner_path(chain: Chain) -> list[Step]:
    """The planner's own steps: the selected path without the synthesizer's step, with the planner's finish step
    back in place when it had one."""
    path = chain.path()
    if not is_hierarchical(chain):
        return path
    synth = set(chain.meta["roles"][SYNTHESIZER])
    steps = [s for s in path if s.id not in synth]
    finish = chain.meta.get("planner_finish")
    return steps + ([Step.from_dict(finish)] if finish else [])


def planner_chain(chain: Chain) -> Chain:
    """The planner's chain as the flat agent would have written it (method `agent`): what step annotation and
    step pairs train the planner on."""
    out = copy.deepcopy(chain)
    out.steps = [copy.deepcopy(s) for s in planner_path(chain)]
    out.selected = out.steps[-1].id if out.steps else None
    out.method = "agent"
    for key in ("roles", "planner_finish", "planner_end", "planner_answer", "synthesizer_passages", "synthesizer"):
        out.meta.pop(key, None)
    return out


def collected_passages(steps: Sequence[Step], corpus: Corpus, max_passages: int | None = None) -> list[Passage]:
    """The distinct passages retrieved on `steps`, in retrieval order (what the synthesizer reads)."""
    ids = list(dict.fromkeys(pid for s in steps for pid in s.retrieved_ids if pid in corpus))
    return [corpus[pid] for pid in ids[:max_passages]]


def synthesizer_prompt(tokenizer, question: str, passages: Sequence[Passage], max_tokens_per_passage: int = 64,
                       answer_prefix: str = ANSWER_PREFIX, prompt: str = "chat") -> str:
    """The synthesizer's prompt: its system prompt, then the numbered passages and the question, and the start of
    its reply (`answer_prefix`); `prompt="protocol"`: see SynthesizerConfig. Built from the question and the
    passages only, so no planner text can reach it."""
    if prompt not in PROMPTS:
        from rag_dpo.errors import InputError
        raise InputError(f"unknown synthesizer prompt {prompt!r} (choose from {', '.join(PROMPTS)})", field="prompt")
    if prompt == "protocol":
        return protocol.render_prompt(tokenizer, question) + \
            protocol.format_observation(passages, tokenizer, max_tokens_per_passage).lstrip("\n") + answer_prefix
    if passages:
        body = protocol.format_observation(passages, tokenizer, max_tokens_per_passage)
        body = body.replace("<information>", "").replace("</information>", "").strip()
        user = f"Passages:\n{body}\n\nQuestion: {question}"
    else:
        user = f"Passages: none were found.\n\nQuestion: {question}"
    messages = [{"role": "system", "content": SYNTHESIZER_PROMPT}, {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix
    return f"{SYNTHESIZER_PROMPT}\n\n{user}\nAssistant: {answer_prefix}"


def _prompts(engine: RolloutEngine, chains: Sequence[Chain], cfg: SynthesizerConfig) -> list[tuple[str, list[str]]]:
    """(prompt text, passage ids) of the synthesizer for each chain's planner path."""
    out = []
    for c in chains:
        passages = collected_passages(planner_path(c), engine.corpus, cfg.max_passages)
        out.append((synthesizer_prompt(engine.tokenizer, c.question, passages, engine.cfg.max_tokens_per_passage,
                                       cfg.answer_prefix, cfg.prompt), [p.id for p in passages]))
    return out


def _ids(engine: RolloutEngine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def _next_id(chain: Chain) -> str:
    nums = [int(s.id) for s in chain.steps if s.id.isdigit()]
    finish = chain.meta.get("planner_finish") or {}
    if str(finish.get("id", "")).isdigit():
        nums.append(int(finish["id"]))
    return str(max(nums, default=-1) + 1)


def planner_end(path: Sequence[Step]) -> str:
    """Why the planner stopped: `answer` (it judged the evidence sufficient), `invalid` or `max_steps`."""
    if not path:
        return "max_steps"
    return {"answer": "answer", "invalid": "invalid"}.get(path[-1].action, "max_steps")


def attach_answer(chain: Chain, text: str, n_tokens: int, passage_ids: list[str]) -> Chain:
    """Turn a planner chain (the engine's linear rollout) into a hierarchical one: the synthesizer's answer step
    replaces the planner's finish step (kept in meta) or follows its last step."""
    path = chain.path()
    end = planner_end(path)
    chain.meta["planner_end"] = end
    if end == "answer":
        finish = path[-1]
        chain.steps = [s for s in chain.steps if s.id != finish.id]
        chain.meta["planner_finish"] = finish.to_dict()
        chain.meta["planner_answer"] = finish.answer
        path = path[:-1]
    parent = path[-1].id if path else None
    step = answer_step(_next_id(chain), parent, text, n_tokens)
    chain.add_step(step)
    chain.selected = step.id
    chain.method = METHOD
    chain.meta["roles"] = {PLANNER: [s.id for s in path], SYNTHESIZER: [step.id]}
    chain.meta["synthesizer_passages"] = passage_ids
    return chain


def synthesize(engine: RolloutEngine, chains: Sequence[Chain], cfg: SynthesizerConfig | None = None) -> list[Chain]:
    """Hierarchical copies of planner chains (e.g. the flat agent's eval chains: the same greedy planner), with
    the synthesizer's answer written by `engine` in one batched generation (greedy or sampled per its config)."""
    cfg = cfg or SynthesizerConfig()
    chains = [planner_chain(c) if is_hierarchical(c) else copy.deepcopy(c) for c in chains]
    prompts = _prompts(engine, chains, cfg)
    contexts = [_ids(engine, p) for p, _ in prompts]
    seeds = [row_seed(engine.cfg.seed, c.question_id, f"{METHOD}:answer") for c in chains]
    outputs = engine.generate_texts(contexts, seeds, engine.cfg.do_sample, cfg.answer_tokens)
    for c, (_, pids), (text, n) in zip(chains, prompts, outputs):
        attach_answer(c, cfg.answer_prefix + text, n, pids)
        c.meta["synthesizer"] = {"prompt": cfg.prompt, "answer_prefix": cfg.answer_prefix}
    return chains


def hierarchical(engine: RolloutEngine, questions: Sequence[Question], cfg: SynthesizerConfig | None = None,
                 synthesizer: RolloutEngine | None = None) -> list[Chain]:
    """Planner / synthesizer chains for `questions`: the engine rolls the planner out (batched, greedy or sampled
    per its config), then `synthesize` writes every answer (`synthesizer`: another engine, e.g. a second adapter
    of the same base loaded as its own policy; default the same engine)."""
    t0 = time.perf_counter()
    chains = synthesize(synthesizer or engine, engine.rollout(questions), cfg)
    per = (time.perf_counter() - t0) / max(1, len(chains))
    for c in chains:
        c.meta["seconds"] = per
    return chains


# ---- answer-level pairs for the synthesizer ---------------------------------------------------------------------
def _duplicate_answers(a: Step, b: Step) -> bool:
    if a.text.strip() == b.text.strip():
        return True
    return (a.action == ANSWER and b.action == ANSWER
            and normalize_answer(a.answer or "") == normalize_answer(b.answer or ""))


def answer_value(step: Step, golds: Sequence[str]) -> float:
    """A synthesizer answer's value: its F1 against the gold answers (0 for an unparsable reply)."""
    return f1_score(step.answer, list(golds)) if step.action == ANSWER else 0.0


def synthesizer_pair_rows(chain: Chain, prompt: str, answers: Sequence[Step], margin: float = 0.1,
                          answer_prefix: str = "") -> list[dict]:
    """At most one TRL preference row for one synthesizer prompt: the highest-F1 answer over the lowest-F1 one
    (ties: the earlier sample), when they differ by >= margin (and > 0) and are not the same answer. Columns are
    `pairs.builders`' step-pair columns (prompt/chosen/rejected + spans, ends_turn and metadata), so the rows save
    with its `step` features.
    `prompt` ends with `answer_prefix`, which chosen and rejected then leave out (the prompt already holds it)."""
    scored = [(answer_value(s, chain.gold_answers), i, s) for i, s in enumerate(answers)]
    for hv, _, hi in sorted(scored, key=lambda x: (-x[0], x[1])):        # ties: the earlier sample
        for lv, _, lo in sorted(scored, key=lambda x: (x[0], x[1])):
            if hv - lv <= 0 or hv - lv < margin or _duplicate_answers(hi, lo):
                continue
            chosen, rejected = (s.text[len(answer_prefix):] if s.text.startswith(answer_prefix) else s.text
                                for s in (hi, lo))
            return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_info_spans": [],
                     "rejected_info_spans": [], "chosen_ends_turn": protocol.ends_turn(hi),
                     "rejected_ends_turn": protocol.ends_turn(lo), "question_id": chain.question_id,
                     "prefix_id": SYNTHESIZER, "chosen_id": hi.id, "rejected_id": lo.id, "chosen_value": hv,
                     "rejected_value": lv, "chosen_action": hi.action, "rejected_action": lo.action,
                     "annotator": "answer-f1"}]
    return []


def sample_synthesizer_answers(engine: RolloutEngine, chains: Sequence[Chain], n: int = 4,
                               cfg: SynthesizerConfig | None = None) -> list[tuple[str, list[Step]]]:
    """(synthesizer prompt, n sampled answer steps) for each chain's planner path, in one batched call; step ids
    are `synth:<j>`, seeds from (seed, question id, j), so the samples do not depend on the batch."""
    cfg = cfg or SynthesizerConfig()
    prompts = _prompts(engine, chains, cfg)
    contexts, seeds = [], []
    for c, (p, _) in zip(chains, prompts):
        ids = _ids(engine, p)
        for j in range(n):
            contexts.append(ids)
            seeds.append(row_seed(engine.cfg.seed, c.question_id, f"{METHOD}:answer", j + 1))
    outputs = engine.generate_texts(contexts, seeds, True, cfg.answer_tokens)
    out = []
    for i, (c, (p, _)) in enumerate(zip(chains, prompts)):
        steps = [answer_step(f"synth:{j}", None, cfg.answer_prefix + outputs[i * n + j][0], outputs[i * n + j][1])
                 for j in range(n)]
        out.append((p, steps))
    return out


def synthesizer_pairs(engine: RolloutEngine, chains: Sequence[Chain], n: int = 4, margin: float = 0.1,
                      cfg: SynthesizerConfig | None = None) -> tuple[list[dict], dict]:
    """Answer-level DPO rows for the synthesizer from planner chains (a rollout pool, or hierarchical chains):
    n sampled answers per chain, preferred by F1. Returns (rows, budget) with the generated tokens spent."""
    cfg = cfg or SynthesizerConfig()
    samples = sample_synthesizer_answers(engine, chains, n, cfg)
    rows = [r for c, (p, steps) in zip(chains, samples)
            for r in synthesizer_pair_rows(c, p, steps, margin, cfg.answer_prefix)]
    tokens = sum(s.generated_tokens for _, steps in samples for s in steps)
    return rows, {"synthesizer_chains": len(chains), "synthesizer_samples": n * len(chains),
                  "synthesizer_generated_tokens": tokens, "synthesizer_rows": len(rows)}

