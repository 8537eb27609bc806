"""How much of a trained policy's change survives a lower-precision dtype, measured where it matters: on the
log-probabilities the policy gives to held-out chains.

Why: a short fine-tune moves weights by less than bf16's rounding step, so casting a *merged* LoRA to bf16 rounds
most of the change away (the policy scores like its starting point). Kept *unmerged*, the base weights are
rounded but the adapter runs in float32 on top, so its contribution to every activation survives. The check: per
chain, the log-prob difference policy - reference in float32, and again in the low dtype (adapters unmerged, as the
rollout engine runs them, and merged, for contrast); the relative error of the differences says what the dtype kept.
"""

from __future__ import annotations

from typing import Sequence

from rag_dpo.agent import protocol
from rag_dpo.records import Chain


def chain_logprobs(model, tokenizer, chains: Sequence[Chain]) -> list[float]:
    """Sum of log-probs of the policy-written tokens of each chain's selected path (retrieved text is context)."""
    import torch
    out = []
    with torch.inference_mode():
        for c in chains:
            tp = protocol.tokenize_path(tokenizer, c.question, c.path())
            ids = torch.tensor([tp.input_ids], device=model.device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            mask = torch.tensor(tp.policy_mask[1:], dtype=torch.bool, device=lp.device)
            out.append(float(lp[mask].sum()))
    return out


def learned_change_kept(policy: str, reference: str, chains: Sequence[Chain], dtype: str = "bfloat16",
                        device: str = "cpu") -> dict:
    """Relative error of the per-chain log-prob change policy - reference in `dtype` against float32:
    `unmerged` (adapters applied on top of rounded base weights) and `merged` (adapters folded into them)."""
    import numpy as np

    from rag_dpo.agent.policy import load_policy
    from rag_dpo.agent.rollout import resolve_dtype

    def change(dt, merge: bool) -> np.ndarray:
        lps = []
        for spec in (policy, reference):
            model, tok = load_policy(spec, device=device, dtype=resolve_dtype(dt, device), merge_adapter=merge)
            lps.append(np.array(chain_logprobs(model, tok, chains)))
            del model
        return lps[0] - lps[1]

    exact = change("float32", True)
    scale = float(np.abs(exact).sum()) or 1.0
    result = {"chains": len(chains), "dtype": dtype, "mean_abs_change_fp32": float(np.abs(exact).mean())}
    for name, merge in (("unmerged", False), ("merged", True)):
        result[f"{name}_relative_error"] = float(np.abs(change(dtype, merge) - exact).sum()) / scale
    return result
