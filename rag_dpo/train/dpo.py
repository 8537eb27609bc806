"""DPO on step-level or outcome-level preference pairs through TRL's DPOTrainer.

Rows are `{prompt, chosen, rejected}`. Step-level pairs share a prefix (the prompt is `render_context` of it) and
their completions are single steps; outcome-level completions are whole chains that contain retrieved text.
TRL's DPOTrainer scores every completion token, so `MaskedDPOTrainer` is a minimal subclass: rows arrive
pre-tokenised with per-token `chosen_mask` / `rejected_mask` (0 on retrieved tokens), and its collator multiplies
TRL's `completion_mask` by them. Every loss TRL computes from `completion_mask` (sigmoid, IPO, the `sft`/NLL term,
...) then skips retrieved text; the reference log-probs (precomputed once by default) use the same mask.

`nll_weight > 0` adds TRL's `sft` loss on the chosen completion (RPO-style), which keeps the shared format of
step pairs from being dragged down with the rejected step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rag_dpo.errors import InputError
from rag_dpo.train.common import (ChainTokenizer, TrainerSettings, check_columns, finish_training, hf_args, is_done,
                                  last_checkpoint, load_dataset_dir, load_trainable)


@dataclass
class DPOSettings(TrainerSettings):
    beta: float = 0.1                        # strength of the implicit KL to the reference policy
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])   # TRL loss types, summed
    loss_weights: list[float] | None = None  # one weight per loss_type (default 1 each)
    nll_weight: float = 0.0                  # > 0: add an NLL term on the chosen completion with this weight (RPO)
    precompute_ref_log_probs: bool = True    # one reference pass before training instead of one per step


def tokenize_pairs(dataset, tokenizer, where: str = "pairs dataset"):
    """{prompt, chosen, rejected} -> prompt_ids, chosen_ids, rejected_ids and per-token chosen/rejected masks."""
    check_columns(dataset, ("prompt", "chosen", "rejected"), where)
    ct = ChainTokenizer(tokenizer)

    def encode(row):
        c, cm = ct.completion(row["chosen"], row.get("chosen_info_spans"))
        r, rm = ct.completion(row["rejected"], row.get("rejected_info_spans"))
        return {"prompt_ids": ct.prompt(row["prompt"]), "chosen_ids": c, "rejected_ids": r,
                "chosen_mask": cm, "rejected_mask": rm}

    out = dataset.map(encode, remove_columns=dataset.column_names, desc="tokenising pairs")
    for i, row in enumerate(out):
        if not any(row["chosen_mask"]) or not any(row["rejected_mask"]):
            raise InputError("a completion has no policy tokens (only retrieved text)", file=where, record=i,
                             field="chosen" if not any(row["chosen_mask"]) else "rejected")
    return out


def _masked_collator_cls():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class MaskedPreferenceCollator(DataCollatorForPreference):
        """TRL's preference collator, with completion_mask zeroed where chosen_mask/rejected_mask are 0."""

        def torch_call(self, examples):
            import torch
            out = super().torch_call(examples)
            width = out["completion_mask"].shape[1]
            rows = [[0] * len(e["prompt_ids"]) + list(e["chosen_mask"]) for e in examples]
            rows += [[0] * len(e["prompt_ids"]) + list(e["rejected_mask"]) for e in examples]
            if self.max_length is not None:
                sl = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
                rows = [r[sl] for r in rows]
            keep = torch.zeros_like(out["completion_mask"])
            for i, r in enumerate(rows):
                keep[i, : len(r)] = torch.tensor(r[:width], dtype=keep.dtype)
            out["completion_mask"] = out["completion_mask"] * keep
            return out

    return MaskedPreferenceCollator


def _masked_trainer_cls():
    from trl import DPOTrainer

    class MaskedDPOTrainer(DPOTrainer):
        """DPOTrainer that accepts rows pre-tokenised by `tokenize_pairs` and keeps their per-token masks."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda r: len(r["prompt_ids"]) < args.max_length,
                                         desc=f"dropping {dataset_name} rows whose prompt fills max_length")
            return dataset

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(self._signature_columns) + ["chosen_mask", "rejected_mask"]

    return MaskedDPOTrainer


def dpo_config(cfg: DPOSettings, out_dir: Path):
    from trl import DPOConfig
    loss_type = list(cfg.loss_type)
    weights = list(cfg.loss_weights) if cfg.loss_weights else [1.0] * len(loss_type)
    if len(weights) != len(loss_type):
        raise InputError("needs one weight per loss_type", field="trainer.loss_weights")
    if cfg.nll_weight > 0:
        loss_type.append("sft")
        weights.append(cfg.nll_weight)
    return hf_args(cfg, out_dir, DPOConfig, beta=cfg.beta, loss_type=loss_type, loss_weights=weights,
                   max_length=cfg.max_length, precompute_ref_log_probs=cfg.precompute_ref_log_probs,
                   remove_unused_columns=True)


def build_dpo_trainer(cfg: DPOSettings, dataset, out_dir: Path, model: str = "smollm2"):
    """(trainer, tokenizer) ready to train; exposed for the benchmark and tests."""
    if isinstance(dataset, (str, Path)):
        dataset = load_dataset_dir(dataset)
    policy, tok, peft_cfg = load_trainable(model, cfg)
    train = tokenize_pairs(dataset, tok)
    args = dpo_config(cfg, out_dir / "checkpoints")
    collator = _masked_collator_cls()(pad_token_id=tok.pad_token_id, max_length=args.max_length,
                                      truncation_mode=args.truncation_mode)
    trainer = _masked_trainer_cls()(model=policy, args=args, train_dataset=train, processing_class=tok,
                                    peft_config=peft_cfg, data_collator=collator)
    return trainer, tok


def train_dpo(cfg: DPOSettings, dataset, out_dir: str | Path, model: str = "smollm2") -> Path:
    """DPO-train `model` (policy spec; an adapter folder is continued and its copy is the reference) on `dataset`
    (datasets.Dataset or save_to_disk folder of {prompt, chosen, rejected}); saves to out_dir, resumable."""
    out_dir = Path(out_dir)
    if is_done(out_dir):
        return out_dir
    trainer, tok = build_dpo_trainer(cfg, dataset, out_dir, model)
    trainer.train(resume_from_checkpoint=last_checkpoint(out_dir / "checkpoints"))
    return finish_training(trainer, tok, out_dir, model,
                           ["loss", "rewards/accuracies", "rewards/margins", "logps/chosen"], "DPO")
