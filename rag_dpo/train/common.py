"""What the SFT, DPO, PPO and PRM trainers share: the trainer settings every recipe names, loading a trainable policy
(fresh LoRA, an existing adapter continued, or full fine-tuning), protocol-aware tokenisation, and saving.

Why we tokenise ourselves instead of letting TRL do it: a search chain is policy text interleaved with retrieved
`<information>` blocks, and only the policy text may be a training target. We cut prompt and completion into the
same segments `agent.protocol.tokenize_path` uses (chat prompt | step text | observation | ...), tokenise each
segment separately (so ids match what the rollout engine generated from) and mark observation tokens 0 in a
per-token mask. Two TRL defaults would be wrong here and are avoided by handing TRL pre-tokenised rows: TRL
appends EOS to every completion (a search step must not end the turn), and scores every completion token.

Precision: weights always stay fp32 (bf16 master weights went NaN in DPO); `precision: auto` turns on bf16
autocast where the CPU/GPU supports it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag_dpo.errors import InputError
from rag_dpo.distributed import deepspeed_launch

INFO_BLOCK = re.compile(r"\n<information>\n.*?\n</information>\n", re.S)


@dataclass
class LoraSettings:
    r: int = 16                     # LoRA rank
    alpha: int = 32                 # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0            # dropout on the LoRA branch
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class TrainerSettings:
    """Optimisation settings shared by every trainer; each maps onto the TRL/HF TrainingArguments field of the same
    name unless noted. `extra` passes any further field of the TRL config (SFTConfig/DPOConfig) through unchanged."""
    learning_rate: float = 1e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1                     # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 1024                  # tokens per sequence (prompt + completion); longer rows keep the start
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 5
    save_steps: int = 50                    # checkpoint interval (resume continues from the last one)
    save_total_limit: int = 2
    precision: str = "auto"                 # auto | bf16 | fp32 -- autocast dtype; weights are always fp32
    full_finetune: bool = False             # train all weights instead of a LoRA adapter
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False
    seed: int = 0
    wandb: bool = True                      # report curves to the current wandb run (rag_dpo.tracking)
    extra: dict[str, Any] = field(default_factory=dict)


PRECISIONS = ("auto", "bf16", "fp32")


def use_bf16(precision: str) -> bool:
    """Whether to autocast to bf16: on a CUDA device that supports it, or a CPU with native bf16 (avx512_bf16/amx)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})",
                         field="trainer.precision")
    if precision != "auto":
        return precision == "bf16"
    import torch
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def hf_args(settings: TrainerSettings, out_dir: str | Path, config_cls, **specific) -> Any:
    """Build a TRL/HF config object (`config_cls`, e.g. trl.DPOConfig) from our settings plus method-specific
    fields. Unknown names in `settings.extra` are an InputError naming the key."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    for key in settings.extra:
        if key not in known:
            raise InputError(f"not a field of {config_cls.__name__}", field=f"trainer.extra.{key}")
    cuda, deepspeed = _cuda(), deepspeed_launch()
    report = "none"
    if settings.wandb:
        import os
        report = "none" if os.environ.get("WANDB_MODE") == "disabled" else "wandb"
    kwargs = dict(
        output_dir=str(out_dir), learning_rate=settings.learning_rate, num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps, per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=global_batch_accumulation(settings.gradient_accumulation_steps),
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type=settings.lr_scheduler_type, weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm, logging_steps=settings.logging_steps, save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit, bf16=use_bf16(settings.precision),
        seed=settings.seed, report_to=report,
        save_strategy="steps", logging_first_step=True, disable_tqdm=False, dataloader_num_workers=0,
        logging_nan_inf_filter=False,   # a NaN loss must show (and stop the run: divergence_guard), not be averaged

        use_cpu=not cuda and not deepspeed,   # DeepSpeed picks its own CPU accelerator
    )
    if deepspeed and not cuda:           # accelerate finds no backend for DeepSpeed on CPU: one process
        kwargs["ddp_backend"] = "gloo"   # (world size 1) unless named
    # always explicit: TRL's configs default to True (slower; recomputes activations)
    kwargs["gradient_checkpointing"] = settings.gradient_checkpointing
    kwargs.update(specific)
    kwargs.update(settings.extra)
    return config_cls(**kwargs)


def global_batch_accumulation(steps: int) -> int:
    """Gradient-accumulation steps per rank that keep the recipe's global batch (per-device batch x accumulation,
    as on one process) under a multi-process launch: DDP multiplies the batch by the world size, so the steps are
    divided by it when they divide evenly (a 2-process warm start then takes the same optimizer steps on the same
    examples as a 1-process one); otherwise they are kept and the global batch grows (said once in the log)."""
    from rag_dpo.distributed import is_main, world_size
    world = world_size()
    if world <= 1:
        return steps
    if steps % world == 0:
        return steps // world
    if is_main():
        print(f"[rag-dpo] note: gradient_accumulation_steps={steps} does not divide by {world} ranks: the global "
              f"batch is {world}x the recipe's", flush=True)
    return steps


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def lora_config(settings: TrainerSettings, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig
    lo = settings.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
                      task_type=task_type, bias="none")


def load_trainable(spec: str, settings: TrainerSettings):
    """(model, tokenizer, peft_config) for training from a policy spec (see agent.policy.load_policy).

    - an adapter folder is continued (loaded trainable; TRL's DPOTrainer keeps a frozen copy as the reference);
    - otherwise a fresh LoRA adapter is described by the returned peft_config (None with full_finetune)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rag_dpo.agent.policy import load_tokenizer, resolve_policy_path

    base, adapter = resolve_policy_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except OSError as e:
        raise InputError(f"cannot load policy: {e}", field="model") from None
    tok = load_tokenizer(spec)
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if adapter:
        from peft import PeftModel
        if settings.full_finetune:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
            return model, tok, None
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        return model, tok, None
    return model, tok, (None if settings.full_finetune else lora_config(settings))


def base_spec(spec: str) -> str:
    """The base-model spec to record in a saved adapter: a bundled name stays a name (portable across machines)."""
    from rag_dpo.agent.policy import BUNDLED
    if spec.lower() in BUNDLED:
        return "smollm2"
    p = Path(spec)
    if (p / "adapter_config.json").exists():
        return json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
    # a model folder (e.g. a run's warm_start link to the cached full fine-tune): absolute, resolved, so the saved
    # adapter loads from any working directory and does not depend on the run folder that linked it
    return str(p.resolve()) if p.is_dir() else spec


def save_policy(model, tokenizer, out_dir: str | Path, spec: str, state_dict: dict | None = None) -> Path:
    """save_pretrained the trained adapter (or full model) + tokenizer so `load_policy(out_dir)` loads it.
    `state_dict`: the whole weights when the model's own are shards (ZeRO-3: see `gathered_state_dict`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = {} if state_dict is None else {"state_dict": state_dict}
    if hasattr(model, "peft_config"):
        for cfg in model.peft_config.values():
            cfg.base_model_name_or_path = base_spec(spec)
        names = [n for n in model.peft_config if n != "ref"]
        model.save_pretrained(out_dir, selected_adapters=names, **whole)
    else:
        model.save_pretrained(out_dir, **whole)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def last_checkpoint(out_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` folder under out_dir (HF Trainer layout), for resume_from_checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint
    out_dir = Path(out_dir)
    return get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None


# ---- protocol-aware tokenisation ----------------------------------------------------------------------------

def _assistant_header(tokenizer) -> str:
    """The text a chat prompt ends with after the user's message (e.g. '<|im_end|>\\n<|im_start|>assistant\\n')."""
    from rag_dpo.agent.protocol import render_prompt
    marker = "\x00Q\x00"
    text = render_prompt(tokenizer, marker)
    return text[text.index(marker) + len(marker):]


def segments(text: str, header: str | None = None) -> list[tuple[str, str]]:
    """Cut text into ('policy'|'info', piece) the way tokenize_path does: after the chat header (if `header` is
    given and present) and around every <information> block."""
    out: list[tuple[str, str]] = []
    if header and header in text:
        cut = text.index(header) + len(header)
        out.append(("prompt", text[:cut]))
        text = text[cut:]
    pos = 0
    for m in INFO_BLOCK.finditer(text):
        if m.start() > pos:
            out.append(("policy", text[pos:m.start()]))
        out.append(("info", m.group(0)))
        pos = m.end()
    if pos < len(text):
        out.append(("policy", text[pos:]))
    return out


def spans_to_segments(text: str, spans: list) -> list[tuple[str, str]]:
    """Cut text at the given retrieved-text character spans into ('policy'|'info', piece) segments."""
    out, pos = [], 0
    for start, end in sorted((int(a), int(b)) for a, b in spans):
        if start > pos:
            out.append(("policy", text[pos:start]))
        out.append(("info", text[start:end]))
        pos = end
    if pos < len(text):
        out.append(("policy", text[pos:]))
    return out


class ChainTokenizer:
    """Tokenise prompts and completions segment-wise, with a per-token mask (1 = policy text, a training target)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.header = _assistant_header(tokenizer)
        self.eos = tokenizer.eos_token

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt(self, text: str) -> list[int]:
        return [i for _, piece in segments(text, self.header) for i in self._encode(piece)]

    def completion(self, text: str, info_spans: list | None = None,
                   ends_turn: bool | None = None) -> tuple[list[int], list[int]]:
        """ids and mask of a completion; EOS is appended only when the policy's turn ended there: `ends_turn` as
        the pair builders record it (`X_ends_turn`, from `protocol.ends_turn`: an answer step), else (rows without
        that column) when the text ends with </answer>. A rejected invalid `<answer></answer>` step ends with the
        tag, but the policy never emitted EOS there, so the data's flag wins. `info_spans` ([start, end) character
        spans of retrieved text, as rag_dpo.pairs writes them) take precedence over finding <information> blocks."""
        pieces = segments(text) if info_spans is None else spans_to_segments(text, info_spans)
        ends = text.rstrip().endswith("</answer>") if ends_turn is None else bool(ends_turn)
        if ends and pieces and self.eos and not text.endswith(self.eos):
            pieces = pieces[:-1] + [(pieces[-1][0], pieces[-1][1] + self.eos)]
        ids, mask = [], []
        for kind, piece in pieces:
            t = self._encode(piece)
            ids += t
            mask += [0 if kind == "info" else 1] * len(t)
        return ids, mask


def check_columns(dataset, needed: tuple[str, ...], where: str) -> None:
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise InputError(f"dataset lacks column '{missing[0]}' (has: {', '.join(dataset.column_names)})",
                         file=where, field=missing[0])


def load_dataset_dir(path: str | Path):
    """A datasets folder saved with save_to_disk (what rag_dpo.pairs writes)."""
    from datasets import load_from_disk
    path = Path(path)
    if not path.exists():
        raise InputError("dataset folder not found", file=str(path))
    try:
        return load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"not a saved datasets folder: {e}", file=str(path)) from None


def plot_curves(log_history: list[dict], keys: list[str], path: str | Path, title: str = "") -> Path | None:
    """PNG of training curves (HF Trainer log_history) for the keys present; None when nothing was logged."""
    rows = [(r.get("step", i), r) for i, r in enumerate(log_history)]
    series = {k: [(s, r[k]) for s, r in rows if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def gathered_state_dict(trainer) -> dict | None:
    """The whole state dict when every rank holds only a shard of each weight (DeepSpeed ZeRO-3, FSDP), gathered
    through accelerate's `get_state_dict` -- a collective, so every rank must call it; None otherwise, where
    save_pretrained reads the (whole) weights itself. ZeRO-3 needs `zero3_save_16bit_model: true` (set in
    recipes/accelerate/zero3.yaml): the gathered weights are then 16-bit."""
    from accelerate.utils import DistributedType
    acc = getattr(trainer, "accelerator", None)
    if acc is None:
        return None
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    zero3 = acc.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3
    if not (zero3 or acc.distributed_type == DistributedType.FSDP):
        return None
    # the DeepSpeed engine (Trainer.model_wrapped) owns the shards; accelerate unwraps and gathers
    return acc.get_state_dict(getattr(trainer, "model_wrapped", None) or trainer.model)


def self_eval_extra(cfg) -> dict:
    """train_done.json's record of the self-evaluation format a policy learnt (what `SelfScorer` must render)."""
    if not getattr(cfg, "self_eval", False):
        return {}
    from rag_dpo.train.self_eval import SCORE_FORMAT
    return {"self_eval_format": SCORE_FORMAT}


def finish_training(trainer, tokenizer, out_dir: Path, spec: str, curve_keys: list[str], title: str,
                    extra: dict | None = None, entropy_flag: bool = True) -> Path:
    """Save the policy, the log history (train_log.json) and a curve PNG; mark the folder done with a summary
    (last log row, global_step, `health` = collapse signs from the log, plus `extra`). Under DDP rank 0 alone
    writes the folder; the other ranks wait for it."""
    from rag_dpo.distributed import barrier, is_main
    from rag_dpo.io import atomic_write_json
    state_dict = gathered_state_dict(trainer)   # every rank takes part in gathering ZeRO-3 shards
    if not is_main():
        barrier("saving the trained policy")
        return out_dir
    save_policy(trainer.model, tokenizer, out_dir, spec, state_dict=state_dict)
    history = trainer.state.log_history
    atomic_write_json(out_dir / "train_log.json", history)
    plot_curves(history, curve_keys, out_dir / "train_curves.png", title)
    summary = {k: v for k, v in (history[-1] if history else {}).items()}
    summary["global_step"] = trainer.state.global_step
    # SFT on a fixed format is meant to lower the entropy (2.1 -> 0.3 in the warm start): numbers only there
    summary["health"] = health(history, entropy_drop=0.25 if entropy_flag else 0.0)
    for flag in summary["health"]["flags"]:
        print(f"[rag-dpo] warning: {out_dir.name}: {flag}", flush=True)
    summary.update(extra or {})
    atomic_write_json(out_dir / "train_done.json", summary)
    from rag_dpo.cards import write_model_card
    write_model_card(out_dir, method=title.lower())   # README.md with hub metadata; the pipeline adds recipe + eval
    barrier("saving the trained policy")
    return out_dir


# ---- divergence guard and collapse signs -------------------------------------------------------------------

class TrainingDiverged(InputError):
    """A non-finite loss, gradient or KL: training stops with one line (the CLI prints it and exits 2); nothing of
    the bad step is saved, so the last checkpoint on disk is the last good one."""


def check_finite(step: int, where: str = "step", **values) -> None:
    """Raise TrainingDiverged naming the step and the first non-finite quantity among `values`."""
    import math
    for name, v in values.items():
        if v is not None and not math.isfinite(float(v)):
            raise TrainingDiverged(f"training diverged at {where} {step}: non-finite {name} ({v}); stopped before "
                                   "saving it, the last checkpoint is the last good one (lower the learning rate "
                                   "or raise beta / the KL coefficient)", field=name)


def divergence_guard():
    """A transformers TrainerCallback for SFT/DPO: before each optimiser step every gradient must be finite (so a
    NaN never reaches the weights), and every logged loss / grad_norm / KL-like value must be finite (checked in
    on_log, which runs before that step's checkpoint is written). `hf_args` turns off `logging_nan_inf_filter`,
    which otherwise hides a NaN loss behind the average of the previous ones."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            import torch
            if model is None:
                return
            for name, p in model.named_parameters():
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    check_finite(state.global_step + 1, grad_norm=float("nan"))
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            for k, v in (logs or {}).items():
                if isinstance(v, (int, float)) and (k in ("loss", "grad_norm") or "kl" in k.lower()
                                                    or k.startswith("logps/")):
                    check_finite(state.global_step, **{k: v})
            return control

    return DivergenceGuard()


def _series(history: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in history if isinstance(r.get(key), (int, float))]


def _tail_mean(xs: list[float], n: int) -> float:
    """Mean of the last n values (all of them if fewer)."""
    last = xs[-n:]
    return sum(last) / len(last)


def health(history: list[dict], kl_key: str = "kl", entropy_keys: tuple[str, ...] = ("entropy", "entropy_proxy"),
           kl_spike: float = 4.0, entropy_drop: float = 0.25) -> dict:
    """Collapse signs in a training log (HF log_history or PPO's per-round rows), as flags a report can print:

    - `likelihood displacement`: DPO's chosen AND rejected log-probs both ended below where they started
      (TRL's rewards/chosen and rewards/rejected are beta * (policy - reference) log-prob: both < 0 in the last
      quarter of the log), the pattern where DPO lowers the rejected step by lowering everything;
    - `KL spike`: a round's KL above `kl_spike` x the median of the rounds before it (and above 0.05 nats);
    - `entropy collapse`: the entropy (TRL's `entropy`, PPO's `entropy_proxy`) fell below `entropy_drop` x its
      first logged value.
    Also returns the first/last values behind each sign, so the report can show the numbers, and for DPO how well
    the policy fits its pairs at the end (`reward_accuracy`, `reward_margin`: means over the last quarter of the
    logs; the margin is TRL's, beta x the log-ratio gap): a policy that barely separates chosen from rejected has
    not moved far from where it started, which is what to check before reading "no difference" as "no effect"."""
    out: dict = {"flags": []}
    tail = max(1, len(history) // 4)
    for key, name in (("rewards/accuracies", "reward_accuracy"), ("rewards/margins", "reward_margin")):
        xs = _series(history, key)
        if xs:
            out[name] = _tail_mean(xs, tail)
    ch, rj = _series(history, "rewards/chosen"), _series(history, "rewards/rejected")
    lc, lr = _series(history, "logps/chosen"), _series(history, "logps/rejected")
    if lc and lr:
        out["logps_chosen"] = [lc[0], lc[-1]]
        out["logps_rejected"] = [lr[0], lr[-1]]
    if ch and rj:
        c_end, r_end = _tail_mean(ch, tail), _tail_mean(rj, tail)
        out["chosen_vs_reference"], out["rejected_vs_reference"] = c_end, r_end
        if c_end < 0 and r_end < 0:
            out["flags"].append(f"likelihood displacement: chosen and rejected log-probs both fell below the "
                                f"reference (beta-scaled {c_end:+.3f} / {r_end:+.3f} over the last {tail} logs)")
    kl = _series(history, kl_key)
    if len(kl) >= 3:
        import statistics
        for i in range(2, len(kl)):
            med = statistics.median(abs(x) for x in kl[:i])
            if kl[i] > max(kl_spike * med, 0.05):
                out["flags"].append(f"KL spike: {kl[i]:.3f} at log {i + 1} (median before {med:.3f})")
                break
        out["kl"] = [kl[0], max(kl), kl[-1]]
    for key in entropy_keys:
        ent = _series(history, key)
        if ent:
            out["entropy"] = [ent[0], ent[-1]]
            if len(ent) >= 2 and ent[0] > 0 and ent[-1] < entropy_drop * ent[0]:
                out["flags"].append(f"entropy collapse: {key} {ent[0]:.3f} -> {ent[-1]:.3f}")
            break
    return out


def is_done(out_dir: str | Path) -> bool:
    return (Path(out_dir) / "train_done.json").exists()
