"""Self-evaluation after the answer (Post-Completion Learning): the policy learns to write, past the end of what a
user sees, its own estimate of the reward of the step it just wrote; the estimate then serves as a free PRM.

Format. After a completion (a step, or a whole chain) the target continues with `Score:D`, one digit
D = round(9 * value) for the completion's value in [0, 1] (the annotator's label on a step, a chain's answer F1),
so value = D / 9, and always follows an EOS: a step that ends the turn has its own; after any other completion (a
search, an invalid step) an EOS is inserted as context only, never a target. Generation stops before it, so at
inference it costs nothing unless asked for. This is `SCORE_FORMAT` 3; a trained folder records its format in
train_done.json (`self_eval_format`; absent = 1) and `SelfScorer` renders each policy as it was trained:
- 1 (before 2026-11-28): `<score>D</score>` right after a search's `</search>`. The DPO-trained policy wrote
  `<score>9</score>` as its next step after an observation in 10 of 161 test chains;
- 2: `<score>D</score>` after an EOS. Still 4 such steps, plus 5 that open with `<>` (a `<think>` without its name):
  every step tag is `<` + name + `>` in tokens, and `<score>` taught `score` after any `<`;
- 3: `Score:` shares no token with the step tags, so the score's NLL has no `<` to attach to.
A digit is one token in SmolLM2's tokenizer (checked: `digit_ids` refuses a tokenizer where it is not), so the
self-score is read from one next-token distribution: `SelfScorer` teacher-forces `path | step | EOS | Score:` and
takes the expected value sum_d p(d) * d / 9 over the ten digit tokens (renormalised), one forward pass per
candidate and no sampling. The suffix is tokenised as its own segments (`Score:`, the digit), like every other
segment in `agent.protocol.tokenize_path`, so training and scoring see the same ids.

Loss. The answer's labels stay exactly today's (suffix tokens are -100 there), and since the model is causal the
suffix cannot change the logits of the tokens before it: the answer loss of a row is unchanged. The suffix tokens
get their own mean NLL, added with `self_eval_weight` (`SelfEvalSFTTrainer`: one forward through TRL's fused LM
head with both label sets, split into the two sums afterwards). Rows with `self_eval_only` (built by
`self_eval_sft_rows`) are context only for the answer: their step is a non-chosen, possibly bad, step, so only its
score is a target -- without them the self-score would only ever see the chosen (good) steps and learn a constant.
With the flag off such rows are dropped and every other row tokenises exactly as `sft.tokenize_sft` does.

DPO (`SelfEvalDPOTrainer`): chosen and rejected each get their own suffix (their values are in the pair rows);
the suffix is outside `completion_mask`, so every DPO loss ignores it; the NLL of both suffixes is added with the
weight. A thin wrapper around the model's forward adds the suffix positions to the labels TRL passes, keeps their
log-probs for the extra term and hands TRL zeros there (what the fused head returns on ignored positions).

Uses: `SelfScorer` plugs into eval's best-of-N (`agent-self-bon`, against the trained PRM's `agent-prm-bon` and
the random pick `agent-random-bon` over the same N samples); `calibration` + `plot_reliability` compare
self-scores with the annotator's labels (expected calibration error and a reliability diagram).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Sequence

from rag_dpo.errors import InputError
from rag_dpo.metrics import auroc, stratified_auroc
from rag_dpo.records import Chain, Label, Step

SCORE_FORMAT = 3                  # what training writes now; see the docstring for 1 and 2
TAGS = {1: ("<score>", "</score>"), 2: ("<score>", "</score>"), 3: ("Score:", "")}   # format -> (open, close)
SCORE_OPEN, SCORE_CLOSE = TAGS[SCORE_FORMAT]
LEVELS = 10                       # digits 0..9; value = digit / 9
SELF_LABEL = "self"               # labels[...] name of a self-score on a step


# ---- the target ----------------------------------------------------------------------------------------------
def score_digit(value: float) -> int:
    """The digit that encodes `value` (clamped to [0, 1]), rounding half up."""
    v = min(1.0, max(0.0, float(value)))
    return int(v * (LEVELS - 1) + 0.5)


def digit_value(digit: int) -> float:
    return digit / (LEVELS - 1)


def score_suffix(value: float) -> str:
    return f"{SCORE_OPEN}{score_digit(value)}{SCORE_CLOSE}"


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def digit_ids(tok) -> list[int]:
    """Token id of each digit 0..9; an InputError when a digit is not exactly one token."""
    ids = []
    for d in range(LEVELS):
        t = _encode(tok, str(d))
        if len(t) != 1:
            raise InputError(f"the digit {d} is {len(t)} tokens in this tokenizer; self-evaluation needs one",
                             field="tokenizer")
        ids.append(t[0])
    return ids


def suffix_ids(tok, value: float) -> list[int]:
    """`Score:D` (the current format's tags around the digit) tokenised segment-wise (open | digit | close)."""
    return _encode(tok, SCORE_OPEN) + [digit_ids(tok)[score_digit(value)]] + _encode(tok, SCORE_CLOSE)


def end_of_turn(tok, completion_ids: Sequence[int]) -> list[int]:
    """What goes between a completion and its score: nothing when it already ends with EOS, else one EOS (context
    only: the caller masks it from every loss, so no step learns to end with an EOS it never wrote)."""
    return [] if completion_ids and completion_ids[-1] == tok.eos_token_id else [tok.eos_token_id]


def score_format(policy) -> int:
    """The self-evaluation format a trained policy folder was trained with (train_done.json; 1 when absent)."""
    import json
    done = Path(str(policy)) / "train_done.json"
    if not done.is_file():
        return SCORE_FORMAT
    return int(json.loads(done.read_text()).get("self_eval_format", 1))


# ---- SFT rows ------------------------------------------------------------------------------------------------
def without_score_only_rows(dataset):
    """The rows a flag-off SFT may train on: a dataset built for self-evaluation also holds non-chosen steps
    (`self_eval_only`), which must never become answer targets. Datasets without that column pass unchanged."""
    if "self_eval_only" not in dataset.column_names:
        return dataset
    return dataset.filter(lambda r: not r["self_eval_only"], desc="dropping self-evaluation-only rows")


def tokenize_sft_self_eval(dataset, tokenizer, max_length: int | None = None, where: str = "sft dataset"):
    """{prompt, completion, value[, self_eval_only]} -> {input_ids, labels, self_eval_labels}.

    `labels` are `sft.tokenize_sft`'s (prompt and retrieved text -100) followed by -100 on the suffix, all -100
    for a self_eval_only row; `self_eval_labels` are -100 except on the suffix. Keep-start truncation to
    `max_length`; rows left without any target are dropped."""
    from rag_dpo.train.common import ChainTokenizer, check_columns
    check_columns(dataset, ("prompt", "completion", "value"), where)
    ct = ChainTokenizer(tokenizer)
    digits = digit_ids(tokenizer)
    open_ids, close_ids = _encode(tokenizer, SCORE_OPEN), _encode(tokenizer, SCORE_CLOSE)

    def encode(row):
        p = ct.prompt(row["prompt"])
        c, m = ct.completion(row["completion"], row.get("completion_info_spans"), row.get("completion_ends_turn"))
        s = open_ids + [digits[score_digit(row["value"])]] + close_ids
        eos = end_of_turn(tokenizer, c)
        answer = [t if k else -100 for t, k in zip(c, m)]
        if row.get("self_eval_only"):
            answer = [-100] * len(c)
        ids = p + c + eos + s
        labels = [-100] * len(p) + answer + [-100] * (len(eos) + len(s))
        se = [-100] * (len(p) + len(c) + len(eos)) + s
        if max_length is not None:
            ids, labels, se = ids[:max_length], labels[:max_length], se[:max_length]
        return {"input_ids": ids, "labels": labels, "self_eval_labels": se}

    out = dataset.map(encode, remove_columns=dataset.column_names, desc="tokenising SFT rows + self-evaluation")
    return out.filter(lambda r: any(x != -100 for x in r["labels"]) or any(x != -100 for x in r["self_eval_labels"]),
                      desc="dropping rows without a target")


def self_eval_sft_rows(chains: Sequence[Chain], tokenizer, cfg=None, annotator: str | None = None,
                       score_only_per_question: int | None = None, seed: int = 0) -> list[dict]:
    """Rows for SFT with self-evaluation: `pairs` sft rows (level step: the chosen steps, trained with their
    values) plus every other labelled step as a `self_eval_only` row (context for its score, never a target), at
    most `score_only_per_question` of them per question (a seeded sample; None = all)."""
    from rag_dpo.pairs.builders import PairConfig, annotator_of, sft_rows
    cfg = cfg or PairConfig()
    name = annotator_of(chains, annotator or cfg.annotator)
    rows = [dict(r, self_eval_only=False) for r in sft_rows(chains, tokenizer, cfg, name)]
    chosen = {(r["question_id"], r["prompt"], r["completion"]) for r in rows}
    return rows + score_only_rows(chains, tokenizer, name, score_only_per_question, seed, skip=chosen)


def score_only_rows(chains: Sequence[Chain], tokenizer, annotator: str, per_question: int | None = None,
                    seed: int = 0, skip=frozenset()) -> list[dict]:
    """Every step of `chains` labelled by `annotator` as a `self_eval_only` row (its context and text as context,
    its label as the score's target), at most `per_question` per question (a seeded sample; None = all); rows whose
    (question id, prompt, completion) is in `skip` are left out."""
    from rag_dpo.agent.protocol import ends_turn, render_context
    rng = random.Random(seed)
    rows = []
    for chain in chains:
        extra = []
        for s in chain.steps:
            label = s.labels.get(annotator)
            if label is None:
                continue
            prompt = render_context(tokenizer, chain.question, chain.prefix(s.id))
            if (chain.question_id, prompt, s.text) in skip:
                continue
            extra.append({"prompt": prompt, "completion": s.text, "completion_info_spans": [],
                          "completion_ends_turn": ends_turn(s), "question_id": chain.question_id,
                          "value": float(label.value), "self_eval_only": True})
        if per_question is not None and len(extra) > per_question:
            extra = rng.sample(extra, per_question)
        rows += extra
    return rows


def build_self_eval_sft(labels_path: str | Path, out_dir: str | Path, tokenizer, cfg=None,
                        annotator: str | None = None, score_only_per_question: int | None = None,
                        seed: int = 0) -> Path:
    """Write `self_eval_sft_rows` of a labelled chains file as a datasets folder (atomically), with
    question_ids.json (every question of the input, for the split guard) and config.json."""
    import dataclasses
    import shutil

    from datasets import Dataset

    from rag_dpo.io import atomic_write_json, file_sha256
    from rag_dpo.pairs.builders import PairConfig
    from rag_dpo.records import read_chains
    cfg = cfg or PairConfig()
    chains = read_chains(labels_path)
    rows = self_eval_sft_rows(chains, tokenizer, cfg, annotator, score_only_per_question, seed)
    if not rows:
        raise InputError("no labelled steps to build self-evaluation rows from", file=str(labels_path))
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    Dataset.from_list(rows).save_to_disk(str(tmp), num_shards=1)
    trained = sum(not r["self_eval_only"] for r in rows)
    atomic_write_json(tmp / "question_ids.json", sorted({c.question_id for c in chains}))
    atomic_write_json(tmp / "budget.json", {"rows": len(rows), "answer_rows": trained,
                                            "self_eval_only_rows": len(rows) - trained,
                                            "questions": len({c.question_id for c in chains})})
    atomic_write_json(tmp / "config.json", {"kind": "sft-self-eval", **dataclasses.asdict(cfg),
                                            "annotator": annotator, "score_only_per_question": score_only_per_question,
                                            "seed": seed, "labels": str(labels_path),
                                            "labels_sha256": file_sha256(labels_path)})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ---- the SFT trainer -----------------------------------------------------------------------------------------
def _collator_cls():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class SelfEvalCollator(DataCollatorForLanguageModeling):
        """TRL's collator, plus `self_eval_labels` padded with -100 like `labels`."""

        def torch_call(self, examples):
            import torch
            from trl.trainer.utils import pad
            out = super().torch_call(examples)
            out["self_eval_labels"] = pad([torch.tensor(e["self_eval_labels"]) for e in examples],
                                          padding_value=-100, padding_side="right",
                                          pad_to_multiple_of=self.pad_to_multiple_of)
            return out

    return SelfEvalCollator


def _sft_trainer_cls():
    from trl import SFTTrainer

    class SelfEvalSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is the answer's NLL (as TRL computes it) + weight x the suffix tokens' mean NLL."""

        self_eval_weight = 0.5

        def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
            if "self_eval_labels" in dataset.column_names:
                return dataset   # tokenised, truncated and filtered by tokenize_sft_self_eval
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(self._signature_columns) + ["self_eval_labels"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch
            mode = "train" if self.model.training else "eval"
            se = inputs.pop("self_eval_labels")
            answer = inputs.pop("labels")
            both = torch.where(se != -100, se, answer)
            out = model(**inputs, labels=both, use_cache=False, fused_lm_head=True)
            width = out.log_probs.size(1)
            amask = (answer[:, 1:] != -100)[:, -width:].to(out.log_probs.dtype)
            smask = (se[:, 1:] != -100)[:, -width:].to(out.log_probs.dtype)
            n_answer = amask.sum() if num_items_in_batch is None else num_items_in_batch
            answer_loss = -(out.log_probs * amask).sum() / torch.as_tensor(n_answer).clamp(min=1)
            se_loss = -(out.log_probs * smask).sum() / smask.sum().clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                answer_loss = answer_loss * self.accelerator.num_processes
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = answer_loss + self.self_eval_weight * se_loss / steps
            n = amask.sum()
            if n > 0:   # a self-evaluation-only micro-batch has no answer token: no entry, not a 0 that dilutes
                self._metrics[mode]["entropy"].append(float((out.entropy.detach() * amask).sum() / n))
                self._metrics[mode]["mean_token_accuracy"].append(float((out.is_top1.detach() * amask).sum() / n))
            if smask.sum() > 0:
                self._metrics[mode]["self_eval_loss"].append(float(se_loss.detach()))
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, out) if return_outputs else loss

    return SelfEvalSFTTrainer


def self_eval_sft_trainer(cfg, policy, tok, peft_cfg, dataset, args, callbacks: list):
    """The SFT trainer for `SFTSettings.self_eval` (sft.train_sft's hook; `args` its SFTConfig): rows tokenised
    with the suffix and a trainer whose loss adds `cfg.self_eval_weight` x the suffix NLL."""
    train = tokenize_sft_self_eval(dataset, tok, cfg.max_length)
    cls = _sft_trainer_cls()
    trainer = cls(model=policy, args=args, train_dataset=train, processing_class=tok, peft_config=peft_cfg,
                  data_collator=_collator_cls()(pad_token_id=tok.pad_token_id), callbacks=callbacks)
    trainer.self_eval_weight = float(cfg.self_eval_weight)
    return trainer


# ---- DPO ------------------------------------------------------------------------------------------------------
def add_pair_suffixes(tokenized, chosen_values: Sequence[float], rejected_values: Sequence[float], tokenizer):
    """`dpo.tokenize_pairs` rows -> the same rows with (EOS where the completion has none, then) `Score:D`
    appended to chosen_ids / rejected_ids, 0 in chosen_mask / rejected_mask there (so no DPO loss sees it) and 1
    only on the score in chosen_se / rejected_se."""
    cv, rv = list(chosen_values), list(rejected_values)

    def add(row, i):
        out = {}
        for side, values in (("chosen", cv), ("rejected", rv)):
            s = suffix_ids(tokenizer, values[i])
            eos = end_of_turn(tokenizer, row[f"{side}_ids"])
            n = len(row[f"{side}_ids"]) + len(eos)
            out[f"{side}_ids"] = list(row[f"{side}_ids"]) + eos + s
            out[f"{side}_mask"] = list(row[f"{side}_mask"]) + [0] * (len(eos) + len(s))
            out[f"{side}_se"] = [0] * n + [1] * len(s)
        return out

    return tokenized.map(add, with_indices=True, desc="adding self-evaluation targets")


def _dpo_collator_cls():
    from rag_dpo.train.dpo import _masked_collator_cls

    class SelfEvalPreferenceCollator(_masked_collator_cls()):
        """The masked preference collator, plus `self_eval_mask` laid out like its completion_mask."""

        def torch_call(self, examples):
            out = super().torch_call(examples)
            out["self_eval_mask"] = self.per_token(examples, "se", out["completion_mask"])
            return out

    return SelfEvalPreferenceCollator


class _ScoreForward:
    """Stands in for the policy in one DPO forward: adds the suffix positions to the labels TRL passes, keeps the
    suffix's mean NLL in `self.nll`, and returns TRL zeros there (what the fused head gives on ignored tokens)."""

    def __init__(self, model, se_mask):
        self.model, self.se, self.nll = model, se_mask, None

    def __call__(self, **kw):
        import torch
        labels = kw.pop("labels", None)
        if labels is None:
            return self.model(**kw)
        labels = torch.where(self.se.bool(), kw["input_ids"], labels)
        out = self.model(**kw, labels=labels)
        width = out.log_probs.size(1)
        smask = self.se[:, 1:][:, -width:].to(out.log_probs.dtype)
        self.nll = -(out.log_probs * smask).sum() / smask.sum().clamp(min=1)
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
            value = getattr(out, name, None)
            if torch.is_tensor(value) and value.shape == smask.shape:
                setattr(out, name, value * (1 - smask).to(value.dtype))
        return out


def _dpo_trainer_cls():
    from rag_dpo.train.dpo import _masked_trainer_cls, share_prompt_forward

    class SelfEvalDPOTrainer(_masked_trainer_cls()):
        """MaskedDPOTrainer + weight x the mean NLL of the chosen and rejected score suffixes."""

        self_eval_weight = 0.5

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(self._signature_columns) + ["chosen_se", "rejected_se"]

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != "self_eval_mask"})

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            fwd = _ScoreForward(share_prompt_forward(self, model), inputs.pop("self_eval_mask"))
            res = super().compute_loss(fwd, inputs, return_outputs, num_items_in_batch)
            loss = res[0] if return_outputs else res
            if fwd.nll is not None:
                loss = loss + self.self_eval_weight * fwd.nll
                self._metrics[mode]["self_eval_loss"].append(float(fwd.nll.detach()))
            return (loss, res[1]) if return_outputs else loss

    return SelfEvalDPOTrainer


def self_eval_dpo_trainer(cfg, policy, tok, peft_cfg, dataset, tokenized, args, callbacks: list):
    """The DPO trainer for `DPOSettings.self_eval` (dpo.build_dpo_trainer's hook): `tokenized` pairs with suffixes
    from the pairs' chosen_value / rejected_value, and a trainer whose loss adds the suffixes' NLL."""
    from rag_dpo.train.common import check_columns
    check_columns(dataset, ("chosen_value", "rejected_value"), "pairs dataset")
    train = add_pair_suffixes(tokenized, dataset["chosen_value"], dataset["rejected_value"], tok)
    collator = _dpo_collator_cls()(pad_token_id=tok.pad_token_id, max_length=args.max_length,
                                   truncation_mode=args.truncation_mode)
    cls = _dpo_trainer_cls()
    cls.share_prompt = cfg.share_prompt
    trainer = cls(model=policy, args=args, train_dataset=train, processing_class=tok, peft_config=peft_cfg,
                  data_collator=collator, callbacks=callbacks)
    trainer.self_eval_weight = float(cfg.self_eval_weight)
    return trainer


def train_score_stage(cfg, pairs_dir: str | Path, start: str | Path, out_dir: str | Path) -> Path:
    """DPO's second stage when `cfg.self_eval_pool_rows` > 0: the score alone (weight 1, no loss on any step's
    text), trained on top of the DPO policy `start` on up to that many labelled steps per question of the pool the
    pairs came from (`pairs_dir`/config.json names its labels). DPO's own targets are the pair rows only, 1 and 0
    within every slot: with them the self-score ranked the slots (step position x action) against their base rates
    and test steps below chance; see docs/variants.md. Same trainer settings as the DPO stage, one epoch."""
    import dataclasses
    import json

    from datasets import Dataset

    from rag_dpo.io import atomic_write_json, file_sha256
    from rag_dpo.records import read_chains
    from rag_dpo.train.common import TrainerSettings, is_done
    from rag_dpo.train.sft import SFTSettings, train_sft
    out_dir = Path(out_dir)
    if is_done(out_dir):
        return out_dir
    config = Path(pairs_dir) / "config.json"
    pairs_cfg = json.loads(config.read_text()) if config.is_file() else {}
    labels, annotator = pairs_cfg.get("labels"), pairs_cfg.get("annotator")
    if not labels or not Path(labels).is_file():
        raise InputError("trainer.self_eval_pool_rows needs the pairs folder's labelled pool (config.json 'labels')",
                         file=str(config), field="labels")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(start))
    rows = score_only_rows(read_chains(labels), tok, annotator, cfg.self_eval_pool_rows, cfg.seed)
    if not rows:
        raise InputError(f"no step of the pool carries a {annotator!r} label", file=labels, field="labels")
    random.Random(cfg.seed).shuffle(rows)
    from trl import SFTConfig
    common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainerSettings)}
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}       # DPO-only extras (e.g. rpo_alpha) stay out
    common["extra"] = {k: v for k, v in cfg.extra.items() if k in sft_fields}
    settings = SFTSettings(**{**common, "num_train_epochs": 1}, self_eval=True, self_eval_weight=1.0)
    out_dir.mkdir(parents=True, exist_ok=True)     # written first: a finished folder always has it
    atomic_write_json(out_dir / "score_stage.json", {"rows": len(rows), "per_question": cfg.self_eval_pool_rows,
                                                     "mean_value": sum(r["value"] for r in rows) / len(rows),
                                                     "questions": len({r["question_id"] for r in rows}),
                                                     "labels": str(labels), "labels_sha256": file_sha256(labels),
                                                     "start": str(start)})
    return train_sft(settings, Dataset.from_list(rows), out_dir, model=str(start))


# ---- the scorer (a free PRM) ---------------------------------------------------------------------------------
class SelfScorer:
    """Scores candidate steps by the policy's own self-evaluation: the expected value of the digit it would write
    after the score tag, in [0, 1]. Same call as `annotate.prm.PRMScorer.score`, so best-of-N takes either."""

    def __init__(self, model, tokenizer, batch_size: int = 8, system_prompt: str | None = None,
                 fmt: int = SCORE_FORMAT, share_prefix: bool = True):
        from rag_dpo.agent.protocol import SYSTEM_PROMPT
        self.model, self.tok, self.batch_size, self.fmt = model, tokenizer, batch_size, fmt
        self.share_prefix = share_prefix    # encode the candidates' common context once (kv_cache.shared_prefix_logits)
        self.system_prompt = system_prompt or SYSTEM_PROMPT
        self.digits = digit_ids(tokenizer)
        self.open_ids = _encode(tokenizer, TAGS[fmt][0])

    def sequence(self, question: str, prefix: Sequence[Step], cand: Step) -> list[int]:
        """Token ids the score digit follows: the path to `cand` as the rollout engine renders it (EOS after an
        answer step), an EOS after any other step from format 2 on, then the format's open tag -- as trained."""
        import dataclasses

        from rag_dpo.agent.protocol import tokenize_path
        path = list(prefix) + [dataclasses.replace(cand, observation="", labels={})]
        ids = tokenize_path(self.tok, question, path, system_prompt=self.system_prompt).input_ids
        return ids + (end_of_turn(self.tok, ids) if self.fmt >= 2 else []) + self.open_ids

    def digit_probs(self, question: str, prefix: Sequence[Step], candidates: Sequence[Step]) -> list[list[float]]:
        """Per candidate, the probabilities of the digits 0..9 (renormalised over the digits)."""
        from rag_dpo.agent.kv_cache import shared_prefix_logits
        seqs = [self.sequence(question, prefix, c) for c in candidates]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        logits = shared_prefix_logits(self.model, seqs, [len(s) - 1 for s in seqs], pad, self.batch_size,
                                      share=self.share_prefix)
        return logits[:, self.digits].softmax(-1).tolist()

    def score(self, question: str, prefix_steps: Sequence[Step], candidate_steps: Sequence[Step]) -> list[float]:
        if not candidate_steps:
            return []
        return [sum(p * digit_value(d) for d, p in enumerate(ps))
                for ps in self.digit_probs(question, prefix_steps, candidate_steps)]


class RandomScorer:
    """The random pick among the same N candidates (best-of-N's control): uniform scores, seeded by the question,
    the prefix length and the candidates' texts, so a rerun picks the same step."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, question: str, prefix_steps: Sequence[Step], candidate_steps: Sequence[Step]) -> list[float]:
        key = "\x00".join([str(self.seed), question, str(len(prefix_steps))] + [c.text for c in candidate_steps])
        rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))
        return [rng.random() for _ in candidate_steps]


def score_chains(scorer, chains: Sequence[Chain], name: str = SELF_LABEL, progress: bool = True) -> None:
    """Put `scorer`'s score on every step of `chains` as `labels[name]` (one call per sibling group)."""
    from tqdm.auto import tqdm

    from rag_dpo.annotate.annotators import sibling_groups
    for chain in tqdm(chains, desc="self-scoring", unit="chain", disable=not progress):
        for parent, kids in sibling_groups(chain):
            prefix = chain.path(parent) if parent is not None else []
            for s, v in zip(kids, scorer.score(chain.question, prefix, kids)):
                s.labels[name] = Label(float(v), float(v) >= 0.5, name)


# ---- calibration ---------------------------------------------------------------------------------------------
def calibration(scores: Sequence[float], labels: Sequence[float], bins: int = 10) -> dict:
    """Reliability of `scores` (predicted values in [0, 1]) against `labels` (the annotator's values in [0, 1]):
    equal-width bins over [0, 1] (a score of 1.0 falls in the last); per bin its count, mean score and mean label;
    `ece` = sum_b n_b / N * |mean label_b - mean score_b|; also the mean absolute error, the means and `auroc`."""
    if len(scores) != len(labels):
        raise ValueError("scores and labels differ in length")
    n = len(scores)
    rows = [{"lo": b / bins, "hi": (b + 1) / bins, "n": 0, "score": 0.0, "label": 0.0} for b in range(bins)]
    for s, y in zip(scores, labels):
        r = rows[min(bins - 1, max(0, int(float(s) * bins)))]
        r["n"] += 1
        r["score"] += float(s)
        r["label"] += float(y)
    ece = 0.0
    for r in rows:
        if r["n"]:
            r["score"] /= r["n"]
            r["label"] /= r["n"]
            ece += r["n"] / n * abs(r["label"] - r["score"])
    return {"n": n, "ece": ece if n else 0.0, "bins": rows,
            "mae": sum(abs(float(s) - float(y)) for s, y in zip(scores, labels)) / n if n else 0.0,
            "mean_score": sum(map(float, scores)) / n if n else 0.0,
            "mean_label": sum(map(float, labels)) / n if n else 0.0,
            "auroc": auroc(scores, [float(y) >= 0.5 for y in labels])}


def plot_reliability(cal: dict, path: str | Path, title: str = "") -> Path:
    """Reliability diagram: mean label against mean self-score per bin (the diagonal is perfect calibration),
    with the bin counts below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in cal["bins"] if r["n"]]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.plot([r["score"] for r in rows], [r["label"] for r in rows], "o-")
    ax.set_ylabel("mean annotator label")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title(title or f"self-score calibration (ECE {cal['ece']:.3f}, n={cal['n']})", fontsize=9)
    width = 1 / max(1, len(cal["bins"]))
    hx.bar([r["lo"] + width / 2 for r in cal["bins"]], [r["n"] for r in cal["bins"]], width=width * 0.9)
    hx.set_xlabel("self-score")
    hx.set_ylabel("steps")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def step_depth(chain: Chain) -> dict[str, int]:
    """Step id -> its position on its path (0 = the first step; siblings share one)."""
    by_id, depth = {s.id: s for s in chain.steps}, {}
    for s in chain.steps:
        d, parent = 0, s.parent
        while parent is not None and parent in by_id:
            d, parent = d + 1, by_id[parent].parent
        depth[s.id] = d
    return depth


def chains_calibration(chains: Sequence[Chain], annotator: str, score_label: str = SELF_LABEL,
                       bins: int = 10) -> dict:
    """`calibration` over every step of `chains` that carries both a `score_label` and an `annotator` label,
    overall, by action and by slot (`step<position>/<action>`, whose label base rates differ: on greedy test chains
    83 % of first searches were good and 22 % of answers), with `auroc_within_slot` (`stratified_auroc`): an overall
    AUROC can fall below chance from a score that only tracks the slot, the wrong way round (docs/variants.md)."""
    pairs = [(s.labels[score_label].value, s.labels[annotator].value, s.action, f"step{depth[s.id]}/{s.action}")
             for c in chains for depth in [step_depth(c)] for s in c.steps
             if score_label in s.labels and annotator in s.labels]
    if not pairs:
        raise InputError(f"no step carries both {score_label!r} and {annotator!r} labels", field="labels")
    out = calibration([p[0] for p in pairs], [p[1] for p in pairs], bins)
    for key, col in (("by_action", 2), ("by_slot", 3)):
        out[key] = {a: calibration([p[0] for p in pairs if p[col] == a], [p[1] for p in pairs if p[col] == a], bins)
                    for a in sorted({p[col] for p in pairs})}
    out["auroc_within_slot"] = stratified_auroc([p[0] for p in pairs], [p[1] >= 0.5 for p in pairs],
                                                [p[3] for p in pairs])
    return out


def group_choice(chains: Sequence[Chain], annotator: str, score_label: str) -> dict:
    """Best-of-N offline, on the sibling groups of a labelled tree (steps sharing a prefix, at least two whose
    labels differ): the mean annotator label of the step with the highest `score_label` (`picked`), against the
    mean label of a uniformly random pick (`random`, the group mean) and of the best step (`best`); and
    `auroc_within_group`, the AUROC over (good, bad) pairs of one group only: what best-of-N needs, since a score
    can rank steps of different chains well (by slot or question) and still not tell apart samples of one context."""
    from rag_dpo.annotate.annotators import sibling_groups
    picked, rand, best = [], [], []
    scores, good, groups = [], [], []
    for chain in chains:
        for parent, kids in sibling_groups(chain):
            kids = [s for s in kids if annotator in s.labels and score_label in s.labels]
            values = [s.labels[annotator].value for s in kids]
            if len(kids) < 2 or max(values) == min(values):
                continue
            scores += [s.labels[score_label].value for s in kids]
            good += [v >= 0.5 for v in values]
            groups += [(chain.question_id, parent)] * len(kids)
            top = max(range(len(kids)), key=lambda i: kids[i].labels[score_label].value)
            picked.append(values[top])
            rand.append(sum(values) / len(values))
            best.append(max(values))
    n = len(picked)
    return {"groups": n, "picked": sum(picked) / n if n else 0.0, "random": sum(rand) / n if n else 0.0,
            "best": sum(best) / n if n else 0.0, "picked_values": picked, "random_values": rand,
            "auroc_within_group": stratified_auroc(scores, good, groups)}


def self_eval_calibration(policy: str, labels_path: str | Path, out_dir: str | Path, annotator: str | None = None,
                          limit: int | None = None, bins: int = 10, device: str = "auto", prm: str | None = None,
                          use_wandb: bool = True) -> dict:
    """Self-score every labelled step of `labels_path` (first `limit` chains) with `policy` and compare with the
    annotator's labels: writes scored_chains.jsonl, calibration.json and reliability.png into out_dir (and the
    numbers and the plot to wandb); returns the calibration dict, whose `choice` holds `group_choice` by self-score
    (and by the PRM folder `prm`, when given). Chains that already carry self-scores (e.g. an `agent-self-bon`
    eval's chains, annotated afterwards) are not rescored."""
    from rag_dpo.agent.policy import load_policy
    from rag_dpo.agent.rollout import resolve_device
    from rag_dpo.io import atomic_write_json
    from rag_dpo.pairs.builders import annotator_of
    from rag_dpo.records import read_chains, write_chains
    chains = read_chains(labels_path)[:limit]
    if annotator is None:   # scores this function wrote (self, prm) are not the annotator's labels
        names = {n for c in chains for s in c.steps for n in s.labels} - {SELF_LABEL, "prm", "random"}
        annotator = next(iter(names)) if len(names) == 1 else None
    name = annotator_of(chains, annotator, str(labels_path))
    if not all(SELF_LABEL in s.labels for c in chains for s in c.steps):
        model, tok = load_policy(policy, device=resolve_device(device))
        score_chains(SelfScorer(model, tok, fmt=score_format(policy)), chains)
    if prm is not None:
        from rag_dpo.annotate.prm import PRMScorer
        score_chains(PRMScorer.load(prm), chains, name="prm")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_chains(out / "scored_chains.jsonl", chains)
    cal = chains_calibration(chains, name, bins=bins)
    cal["choice"] = {"self": group_choice(chains, name, SELF_LABEL)}
    if prm is not None:
        cal["choice"]["prm"] = group_choice(chains, name, "prm")
    cal.update({"policy": str(policy), "labels": str(labels_path), "annotator": name, "chains": len(chains)})
    atomic_write_json(out / "calibration.json", cal)
    plot = plot_reliability(cal, out / "reliability.png",
                            f"{Path(str(policy)).name}: self-score vs {name} (ECE {cal['ece']:.3f}, n={cal['n']})")
    if use_wandb:
        from rag_dpo import tracking
        run = tracking.init_run("self-eval-calibration", config={"policy": str(policy), "labels": str(labels_path)},
                                job_type="eval", dir=out)
        tracking.log(run, {"ece": cal["ece"], "mae": cal["mae"], "n": cal["n"]})
        tracking.log_image(run, "reliability", plot)
        tracking.finish(run)
    return cal
