"""The process reward model (PRM) format, its scorer, and the `prm` annotator.

Saved format (a folder; written by `save_prm`, read by `PRMScorer.load`):
- a transformers `AutoModelForTokenClassification` checkpoint (safetensors) with `num_labels=2`, label 1 = good
  step, e.g. `LlamaForTokenClassification` on the SmolLM2 backbone; plus its tokenizer (`save_pretrained`);
- `prm.json`: `{"format": "rag_dpo-prm", "version": 1, "max_length": N, "system_prompt": "..."}`.

A step's score is softmax(logits)[1] at the *last token of the step's own text*, in the token sequence that
`agent.protocol.tokenize_path(..., add_eos=False)` builds for the path ending with that step (prompt, then each
step's text and observation tokenised segment by segment). Training data (pairs `--kind stepwise`) is TRL's
stepwise-supervision format, `{prompt, completions, labels}`, where completion i is the retrieved text that
followed step i-1 (empty for i = 0) and then step i's text, and `completion_info_spans[i]` is the character span
of that retrieved text. `encode_stepwise` turns a row into `input_ids` + token `labels` (-100 except at each step's
last token) with the same segment-wise tokenisation, so training and scoring see identical tokens: the PRM
trainer should use it rather than re-tokenising.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from rag_dpo.annotate.annotators import Annotator, AnnotatorConfig
from rag_dpo.errors import InputError
from rag_dpo.records import Step

PRM_FORMAT, PRM_VERSION = "rag_dpo-prm", 1


def encode_stepwise(tokenizer, prompt: str, completions: Sequence[str], labels: Sequence[bool],
                    completion_info_spans: Sequence[Sequence[Sequence[int]]] | None = None,
                    max_length: int | None = None) -> dict:
    """One stepwise row -> {input_ids, labels}: token labels are 0/1 at each step's last token, -100 elsewhere.
    Steps cut off by `max_length` lose their label (keep-start truncation)."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    ids = enc(prompt)
    tok_labels = [-100] * len(ids)
    for i, (comp, good) in enumerate(zip(completions, labels)):
        spans = completion_info_spans[i] if completion_info_spans else []
        cut = max((e for _, e in spans), default=0)
        info, text = comp[:cut], comp[cut:]
        for seg in (info, text):
            t = enc(seg)
            ids += t
            tok_labels += [-100] * len(t)
        if text:
            tok_labels[-1] = int(bool(good))
    if max_length is not None:
        ids, tok_labels = ids[:max_length], tok_labels[:max_length]
    return {"input_ids": ids, "labels": tok_labels}


def save_prm(model, tokenizer, out_dir: str | Path, max_length: int = 2048, system_prompt: str | None = None) -> Path:
    """Write a PRM folder in the format above (model + tokenizer + prm.json)."""
    from rag_dpo.agent.protocol import SYSTEM_PROMPT
    from rag_dpo.io import atomic_write_json
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / "prm.json", {"format": PRM_FORMAT, "version": PRM_VERSION, "max_length": max_length,
                                         "system_prompt": system_prompt or SYSTEM_PROMPT})
    return out


class PRMScorer:
    """Scores candidate next steps with a saved PRM (higher = better; a probability in [0, 1])."""

    def __init__(self, model, tokenizer, max_length: int = 2048, system_prompt: str | None = None,
                 batch_size: int = 16):
        from rag_dpo.agent.protocol import SYSTEM_PROMPT
        self.model, self.tok = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.system_prompt = system_prompt or SYSTEM_PROMPT
        self.share_prefix = True      # encode the candidates' common context once (kv_cache.shared_prefix_logits)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "PRMScorer":
        from transformers import AutoModelForTokenClassification, AutoTokenizer
        path = Path(path)
        meta_file = path / "prm.json"
        if not meta_file.exists():
            raise InputError("not a PRM folder (prm.json missing)", file=str(path))
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON ({e.msg})", file=str(meta_file)) from None
        if meta.get("format") != PRM_FORMAT or meta.get("version") != PRM_VERSION:
            raise InputError(f"unsupported PRM format {meta.get('format')!r} v{meta.get('version')!r}",
                             file=str(meta_file), field="format")
        model = AutoModelForTokenClassification.from_pretrained(path)
        if model.config.num_labels != 2:
            raise InputError(f"a PRM has 2 labels, this model has {model.config.num_labels}",
                             file=str(path / "config.json"), field="num_labels")
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if device:
            model.to(device)
        model.eval()
        return cls(model, tok, meta.get("max_length", 2048), meta.get("system_prompt"))

    def _sequence(self, question: str, prefix: Sequence[Step], cand: Step) -> tuple[list[int], int]:
        from rag_dpo.agent.protocol import tokenize_path
        path = list(prefix) + [dataclasses.replace(cand, observation="", labels={})]
        tp = tokenize_path(self.tok, question, path, system_prompt=self.system_prompt, add_eos=False)
        ids, last = tp.input_ids, tp.step_spans[-1][1] - 1
        if len(ids) > self.max_length:   # keep the end: the step being scored must be inside the window
            drop = len(ids) - self.max_length
            ids, last = ids[drop:], last - drop
        return ids, last

    def score(self, question: str, prefix_steps: Sequence[Step], candidate_steps: Sequence[Step]) -> list[float]:
        from rag_dpo.agent.kv_cache import shared_prefix_logits
        if not candidate_steps:
            return []
        seqs = [self._sequence(question, prefix_steps, c) for c in candidate_steps]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        logits = shared_prefix_logits(self.model, [ids for ids, _ in seqs], [last for _, last in seqs], pad,
                                      self.batch_size, share=self.share_prefix)
        return logits.softmax(-1)[:, 1].tolist()


class PRMAnnotator(Annotator):
    name = "prm"

    def __init__(self, scorer: PRMScorer, cfg: AnnotatorConfig | None = None):
        super().__init__(cfg)
        self.scorer = scorer

    def label_groups(self, groups):
        for chain, steps in groups:
            if not steps:
                continue
            values = self.scorer.score(chain.question, chain.prefix(steps[0].id), steps)
            for s, v in zip(steps, values):
                s.labels[self.name] = self.label(v, {"prm_calls": 1.0 / len(steps)})
