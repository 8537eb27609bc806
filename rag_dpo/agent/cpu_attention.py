"""Attention for the cached rollout engine in bf16/fp16 on a CPU, where torch's SDPA kernel is the slow part.

Why (measured on the project's 2-core CPU, SmolLM2-135M shapes: 9 query heads over 3 key/value heads, head_dim 64):
- A decode step (one query per row over a wide cache) spent about a third of its time in SDPA: 2.4-3.9 ms a layer
  at 64 rows x 400 columns in bf16, against 0.9-1.2 ms for two batched matmuls with the softmax between them.
  The grouped heads ride along as three "queries" of their key/value head, so nothing is repeated or copied.
- The matmuls must read contiguous keys/values: on a slice of a longer cache, bmm first copies it, slowly (3.5 vs
  0.95 ms). So the engine's batch caches are `whole`: attention reads every preallocated column of the layer (the
  unwritten ones masked), a few dozen columns more than needed and no copy.
- A prefill forward (hundreds of new tokens over the cached context) keeps SDPA's flash kernel, which beats
  matmuls at those shapes, but with the grouped heads passed as such (`enable_gqa`) instead of repeated: 0-12 %
  faster (three shapes). Its attention is still ~35 % of a prefill forward at 600 columns; casting to float32 for the kernel was
  no faster in the model (it is in isolation).

Precision: scores are accumulated in float32 by the matmul but stored in bf16 before the float32 softmax, a rounding
of the size the bf16 queries and keys already carry. Measured teacher-forced on 48 real chains (~530 tokens,
prefill then 24 decode steps): against float32, top-1 agreement 99.65 % and mean |log-prob difference| of the chain's
token 0.0050, against 99.65 % and 0.0058 for bf16 SDPA.

Anything else (float32, CUDA, gradients on, no 4D mask, other attention extras) goes to transformers' SDPA unchanged,
so the function is safe on any model the engine is handed, PPO's training model included.
"""

from __future__ import annotations

import contextlib

NAME = "rag_dpo_cpu"


def cpu_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers' attention-function signature; query [B, H, q, d], key/value [B, KV, W, d]; returns the
    output as [B, q, H, d] (and no weights)."""
    import torch

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if (query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16) or torch.is_grad_enabled()
            or attention_mask is None or attention_mask.dim() != 4 or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("sliding_window")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, heads, q, dim = query.shape
    kv_heads, width = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim ** -0.5
    mask = attention_mask[:, :, :, :width]
    if q == 1:
        grouped = query.view(b, kv_heads, heads // kv_heads, dim)         # head h reads key/value head h // rep
        scores = torch.matmul(grouped, key.transpose(-1, -2)).float()     # [B, KV, rep, W]
        probs = (scores * scale + mask).softmax(-1).to(value.dtype)       # the mask broadcasts over heads
        return torch.matmul(probs, value).reshape(b, 1, heads, dim), None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                           enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `NAME` a transformers attention implementation (idempotent); a 4D mask is passed through as is."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(NAME, cpu_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def applies(model) -> bool:
    """Whether the engine should use this attention: a half-precision model on a CPU."""
    import torch
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def using(model):
    """Run the model's attention layers through `cpu_attention_forward` inside the block, then restore."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = register()
    try:
        yield
    finally:
        config._attn_implementation = before
