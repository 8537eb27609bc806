"""LLM-as-judge annotator (RAG-Gym's ranking critic): an LLM ranks the K candidate next steps at a prefix.

Two backends with one method, `complete(prompts) -> [(reply, completion_tokens)]`:
- `HTTPJudge`: any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, OpenAI, ...). The key is
  read from the environment variable *named* in the config (`api_key_env`), never given literally. Requests run
  a few at a time in threads, with bounded retries on connection errors, 429 and 5xx.
- `HFJudge`: a local transformers chat model (batched `generate`, greedy).

A group of K >= 2 candidates becomes one prompt asking for the candidate numbers best first; the values are
linear in rank (best 1, worst 0). A single candidate is asked yes/no (1 or 0). A reply that does not parse gives
every candidate 0.5 (no preference, so no pair is built from it) and `info.parse_error`; the count is printed.
The call's cost (1 judge call and its completion tokens) is split evenly over the group's labels.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from rag_dpo.annotate.annotators import Annotator, AnnotatorConfig, JudgeConfig, rank_values
from rag_dpo.errors import InputError
from rag_dpo.records import Chain, Step

MAX_OBS_CHARS = 400   # retrieved text shown to the judge per step (keeps prompts short)


def _show(step: Step) -> str:
    obs = step.observation.strip()
    if len(obs) > MAX_OBS_CHARS:
        obs = obs[:MAX_OBS_CHARS] + " ..."
    return step.text.strip() + (f"\n{obs}" if obs else "")


def judge_prompt(question: str, prefix: Sequence[Step], candidates: Sequence[Step]) -> str:
    history = "\n\n".join(f"Step {i + 1}:\n{_show(s)}" for i, s in enumerate(prefix)) or "(no steps yet)"
    head = (f"You are judging a search agent that answers a multi-hop question by searching Wikipedia.\n\n"
            f"Question: {question}\n\nSteps so far:\n{history}\n\n")
    if len(candidates) == 1:
        return head + (f"Proposed next step:\n{candidates[0].text.strip()}\n\nIs this a useful next step toward "
                       "answering the question correctly? Reply with yes or no only.")
    cands = "\n\n".join(f"[{i + 1}] {c.text.strip()}" for i, c in enumerate(candidates))
    return head + (f"Candidate next steps:\n{cands}\n\nRank the candidates from best to worst next step toward "
                   f"answering the question correctly. Reply with the candidate numbers only, best first, "
                   f"separated by commas (for example: {','.join(str(i) for i in range(len(candidates), 0, -1))}).")


def parse_judgement(reply: str, k: int) -> list[float] | None:
    """Values for k candidates from a reply; None when it does not parse."""
    text = reply.strip().lower()
    if k == 1:
        m = re.search(r"\b(yes|no)\b", text)
        return None if m is None else [1.0 if m.group(1) == "yes" else 0.0]
    order: list[int] = []
    for tok in re.findall(r"\d+", text):
        i = int(tok) - 1
        if 0 <= i < k and i not in order:
            order.append(i)
    return rank_values(order, k) if order else None


class HTTPJudge:
    """OpenAI-compatible chat completions over HTTP (stdlib urllib; no SDK needed)."""

    def __init__(self, cfg: JudgeConfig):
        if not cfg.url:
            raise InputError("the HTTP judge needs a URL", field="judge.url")
        url = cfg.url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.cfg = cfg
        self.key = None
        if cfg.api_key_env:
            self.key = os.environ.get(cfg.api_key_env)
            if not self.key:
                raise InputError(f"environment variable {cfg.api_key_env} (the judge's API key) is not set",
                                 field="judge.api_key_env")

    def _one(self, prompt: str) -> tuple[str, int]:
        body = json.dumps({"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                try:
                    text = data["choices"][0]["message"]["content"] or ""
                except (KeyError, IndexError, TypeError):
                    raise InputError("reply is not an OpenAI chat completion (no choices[0].message.content)",
                                     file=self.url) from None
                return text, int((data.get("usage") or {}).get("completion_tokens") or 0)
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    raise InputError(f"judge endpoint refused the request: HTTP {e.code} {e.reason}",
                                     file=self.url) from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < self.cfg.max_retries:
                time.sleep(min(0.5 * 2 ** attempt, 8.0))
        raise InputError(f"judge endpoint failed after {self.cfg.max_retries + 1} attempts: {last}", file=self.url)

    def complete(self, prompts: list[str]) -> list[tuple[str, int]]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.batch_size, len(prompts)))) as pool:
            return list(pool.map(self._one, prompts))


class HFJudge:
    """A local chat model through transformers (greedy, left-padded batches)."""

    def __init__(self, cfg: JudgeConfig, model=None, tokenizer=None):
        if model is None:
            from rag_dpo.agent.policy import load_policy
            model, tokenizer = load_policy(cfg.model or "smollm2")
        self.model, self.tok, self.cfg = model, tokenizer, cfg

    def complete(self, prompts: list[str]) -> list[tuple[str, int]]:
        import torch
        out = []
        tok = self.tok
        side, tok.padding_side = tok.padding_side, "left"
        try:
            for i in range(0, len(prompts), self.cfg.batch_size):
                chunk = [p if not getattr(tok, "chat_template", None) else
                         tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
                         for p in prompts[i:i + self.cfg.batch_size]]
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
                with torch.no_grad():
                    gen = self.model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                              pad_token_id=tok.pad_token_id)
                for row in gen[:, enc["input_ids"].shape[1]:]:
                    ids = [t for t in row.tolist() if t != tok.pad_token_id]
                    out.append((tok.decode(ids, skip_special_tokens=True), len(ids)))
        finally:
            tok.padding_side = side
        return out


def build_judge_backend(cfg: JudgeConfig):
    return HTTPJudge(cfg) if cfg.url else HFJudge(cfg)


class JudgeAnnotator(Annotator):
    name = "judge"

    def __init__(self, backend, cfg: AnnotatorConfig | None = None):
        super().__init__(cfg)
        self.backend = backend
        self.parse_failures = 0

    def label_groups(self, groups):
        groups = [(c, steps) for c, steps in groups if steps]
        prompts = [judge_prompt(c.question, c.prefix(steps[0].id), steps) for c, steps in groups]
        replies = self.backend.complete(prompts) if prompts else []
        for (chain, steps), (reply, ntok) in zip(groups, replies):
            k = len(steps)
            values = parse_judgement(reply, k)
            info = {"reply": reply[:200]}
            if values is None:
                self.parse_failures += 1
                values, info["parse_error"] = [0.5] * k, "no ranking in the judge's reply"
            cost = {"judge_calls": 1.0 / k, "generated_tokens": ntok / k}
            for s, v in zip(steps, values):
                s.labels[self.name] = self.label(v, cost, **info)
