"""Supervised fine-tuning (the warm start, or SFT on positive chains) through TRL's SFTTrainer.

Input rows are `{prompt, completion}` (what rag_dpo.pairs writes; a completion may be one step or a whole chain with
retrieved `<information>` blocks). We hand SFTTrainer pre-tokenised `input_ids` + `labels`, built by
`common.ChainTokenizer`: the prompt and every retrieved token get label -100, so the loss covers only the policy's
own text. (SmolLM2's chat template has no generation markers, so TRL's assistant-only loss cannot do this.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rag_dpo.train.common import (ChainTokenizer, TrainerSettings, check_columns, divergence_guard, finish_training,
                                  hf_args, is_done, last_checkpoint, load_dataset_dir, load_trainable,
                                  self_eval_extra)


@dataclass
class SFTSettings(TrainerSettings):
    """SFT uses the shared trainer settings (loss: mean NLL over policy tokens)."""
    self_eval: bool = False          # also learn to write <score>D</score> after each completion (train/self_eval.py)
    self_eval_weight: float = 0.5    # weight of that self-evaluation loss term (the answer's loss is unchanged)


def tokenize_sft(dataset, tokenizer, where: str = "sft dataset"):
    """{prompt, completion} rows -> {input_ids, labels} with prompt and retrieved tokens at -100."""
    check_columns(dataset, ("prompt", "completion"), where)
    ct = ChainTokenizer(tokenizer)

    def encode(row):
        p = ct.prompt(row["prompt"])
        c, m = ct.completion(row["completion"], row.get("completion_info_spans"), row.get("completion_ends_turn"))
        return {"input_ids": p + c, "labels": [-100] * len(p) + [t if k else -100 for t, k in zip(c, m)]}

    return dataset.map(encode, remove_columns=dataset.column_names, desc="tokenising SFT rows")


def train_sft(cfg: SFTSettings, dataset, out_dir: str | Path, model: str = "smollm2") -> Path:
    """Fine-tune `model` (policy spec: bundled name, HF folder, or adapter folder to continue) on `dataset` (a
    datasets.Dataset or a save_to_disk folder); saves adapter/model + tokenizer to out_dir and returns it.
    Resumes from out_dir/checkpoints; returns at once if out_dir already holds a finished run."""
    out_dir = Path(out_dir)
    if is_done(out_dir):
        return out_dir
    from trl import SFTConfig, SFTTrainer

    if isinstance(dataset, (str, Path)):
        dataset = load_dataset_dir(dataset)
    # the arguments first: under DeepSpeed ZeRO-3 creating them switches on transformers' zero.Init, so the model
    # loaded next is partitioned across ranks (loaded before, every rank holds whole weights TRL cannot run)
    args = hf_args(cfg, out_dir / "checkpoints", SFTConfig, max_length=cfg.max_length, packing=False,
                   dataset_num_proc=None)
    policy, tok, peft_cfg = load_trainable(model, cfg)
    from rag_dpo.train.self_eval import self_eval_sft_trainer, without_score_only_rows
    if cfg.self_eval:
        trainer = self_eval_sft_trainer(cfg, policy, tok, peft_cfg, dataset, args, [divergence_guard()])
    else:
        train = tokenize_sft(without_score_only_rows(dataset), tok)
        trainer = SFTTrainer(model=policy, args=args, train_dataset=train, processing_class=tok,
                             peft_config=peft_cfg, callbacks=[divergence_guard()])
    trainer.train(resume_from_checkpoint=last_checkpoint(out_dir / "checkpoints"))
    return finish_training(trainer, tok, out_dir, model, ["loss", "mean_token_accuracy", "entropy", "learning_rate",
                                                          "self_eval_loss"], "SFT", entropy_flag=False,
                           extra=self_eval_extra(cfg))
