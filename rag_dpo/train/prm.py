"""Process reward model training: a 2-way token-classification head on a small backbone, trained at step ends.

Data: TRL's stepwise-supervision rows `{prompt, completions, labels}` (rag_dpo.pairs `--kind stepwise`), encoded by
`annotate.prm.encode_stepwise` so training sees exactly the tokens `PRMScorer` scores (label at each step's last
token, -100 elsewhere; retrieved text is context only). TRL 1.16 ships no PRM trainer, so this uses transformers'
Trainer with `AutoModelForTokenClassification`. With LoRA the adapter (and the new `score` head) are merged before
saving, because the PRM format (annotate/prm.py: `save_prm`) is a plain checkpoint + prm.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rag_dpo.train.common import (TrainerSettings, check_columns, hf_args, is_done, last_checkpoint,
                                  load_dataset_dir, lora_config)


@dataclass
class PRMSettings(TrainerSettings):
    """PRM training uses the shared settings; `max_length` also bounds scoring (stored in prm.json)."""


def encode_prm_rows(dataset, tokenizer, max_length: int, where: str = "stepwise dataset"):
    from rag_dpo.annotate.prm import encode_stepwise
    check_columns(dataset, ("prompt", "completions", "labels"), where)

    def enc(row):
        return encode_stepwise(tokenizer, row["prompt"], row["completions"], row["step_labels"],
                               row.get("completion_info_spans"), max_length=max_length)

    # rename first: a mapped column that keeps its input's name keeps its input's *type* (bool), which would
    # silently turn the token labels -100/0/1 into True/False/True
    dataset = dataset.rename_column("labels", "step_labels")
    out = dataset.map(enc, remove_columns=dataset.column_names, desc="encoding stepwise rows")
    return out.filter(lambda r: any(x != -100 for x in r["labels"]), desc="dropping rows with no labelled step")


def train_prm(cfg: PRMSettings, dataset, out_dir: str | Path, model: str = "smollm2") -> Path:
    """Train a PRM on `dataset` (Dataset or save_to_disk folder of stepwise rows) from backbone `model`; writes the
    PRM folder (annotate/prm.py format) to out_dir. Resumable from out_dir/checkpoints."""
    out_dir = Path(out_dir)
    if is_done(out_dir):
        return out_dir
    import torch
    from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification, Trainer, TrainingArguments

    from rag_dpo.agent.policy import load_tokenizer, resolve_policy_path
    from rag_dpo.annotate.prm import save_prm
    from rag_dpo.io import atomic_write_json
    from rag_dpo.train.common import plot_curves

    if isinstance(dataset, (str, Path)):
        dataset = load_dataset_dir(dataset)
    base, adapter = resolve_policy_path(model)
    tok = load_tokenizer(model)
    args = hf_args(cfg, out_dir / "checkpoints", TrainingArguments, remove_unused_columns=False)  # before the model: zero.Init
    backbone = AutoModelForTokenClassification.from_pretrained(base, num_labels=2, dtype=torch.float32)
    backbone.config.pad_token_id = tok.pad_token_id
    net = backbone
    if not cfg.full_finetune:
        from peft import get_peft_model
        net = get_peft_model(backbone, lora_config(cfg, task_type="TOKEN_CLS"))
    train = encode_prm_rows(dataset, tok, cfg.max_length)
    trainer = Trainer(model=net, args=args, train_dataset=train,
                      data_collator=DataCollatorForTokenClassification(tok, padding=True))
    trainer.train(resume_from_checkpoint=last_checkpoint(out_dir / "checkpoints"))
    final = net.merge_and_unload() if hasattr(net, "merge_and_unload") else net
    save_prm(final, tok, out_dir, max_length=cfg.max_length)
    history = trainer.state.log_history
    atomic_write_json(out_dir / "train_log.json", history)
    plot_curves(history, ["loss", "learning_rate"], out_dir / "train_curves.png", "PRM")
    atomic_write_json(out_dir / "train_done.json", {"global_step": trainer.state.global_step,
                                                    "rows": len(train)})
    return out_dir
