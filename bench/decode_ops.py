"""Work per forward of the two hf engines, for hardware where each forward is launch-bound (a GPU with a small
model): aten ops, forwards and wall time per generate call, `generate` (`cache: none`) against the cached loop
(`cache: prefix`), same contexts, random weights (speed does not depend on them).

    .venv/bin/python bench/decode_ops.py                 # CPU proxy: 30-layer tiny model, 32 rows, greedy
    .venv/bin/python bench/decode_ops.py --rows 64 --sample
    python3 bench/decode_ops.py --device cuda --shape smollm2 --dtype bfloat16 --profile   # on a GPU

On a CPU with `--shape tiny` the arithmetic is negligible, so the time is dispatch: a proxy that counts ops (views
included, which launch no kernel) but cannot see host syncs or kernel choice. On CUDA, `--profile` adds the top
kernels by GPU time (on a CPU: ops by CPU time) and the host syncs (`cudaStreamSynchronize`, `cudaMemcpy*`) of each engine's call.
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rag_dpo.agent.policy import ensure_pad_token, tiny_policy
from rag_dpo.agent.rollout import CachedHFBackend, HFBackend, RolloutConfig

TOKENIZER = Path(__file__).parent.parent / "tests" / "assets" / "smollm2_tokenizer"


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class ForwardCount:
    """Counts the model's forward calls (a forward hook)."""

    def __init__(self, model):
        self.n = 0
        model.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def smollm2_shaped(layers: int):
    """A randomly initialised Llama of SmolLM2-135M's widths (576 hidden, 9 heads, 3 key/value heads, 1536 MLP)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    ensure_pad_token(tok)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile(backend, contexts, seeds, sample, cfg, name: str, device: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    cuda = device.startswith("cuda")
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        backend.generate(contexts, seeds, sample, cfg)
        sync(device)
    backend.clear()
    events = prof.key_averages()
    syncs = {e.key: e.count for e in events if "Synchronize" in e.key or "Memcpy" in e.key}
    print(f"--- {name}: host syncs and copies {syncs}")
    print(events.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=12,
                       max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--layers", type=int, default=30, help="SmolLM2-135M has 30")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--sample", action="store_true")
    p.add_argument("--shape", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: hidden 64 (dispatch only); smollm2: SmolLM2-135M's widths")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--profile", action="store_true", help="CUDA: top kernels and host syncs per engine")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    model, tok = smollm2_shaped(args.layers) if args.shape == "smollm2" else tiny_policy(TOKENIZER, layers=args.layers,
                                                                                        hidden=64)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    forwards = ForwardCount(model)
    rng = random.Random(0)
    head = tok("You answer multi-hop questions by searching a corpus.", add_special_tokens=False)["input_ids"]
    contexts = [head + [rng.randrange(1000, 20000) for _ in range(rng.randrange(200, 300))] for _ in range(args.rows)]
    cfg = RolloutConfig(max_new_tokens=args.new_tokens, batch_size=2 * args.rows, decode_rows=args.rows)
    seeds = list(range(args.rows))
    for name, backend in (("generate", HFBackend(model, tok)), ("cached", CachedHFBackend(model, tok))):
        backend.generate(contexts, seeds, args.sample, cfg)                 # warm-up (allocator, kernels)
        backend.clear()
        sync(args.device)
        t0, f0 = time.perf_counter(), forwards.n
        outs = backend.generate(contexts, seeds, args.sample, cfg)
        sync(args.device)
        wall, n_forwards = time.perf_counter() - t0, forwards.n - f0
        backend.clear()
        if args.profile:
            profile(backend, contexts, seeds, args.sample, cfg, name, args.device)
        with OpCount() as count:
            backend.generate(contexts, seeds, args.sample, cfg)
        backend.clear()
        ops = sum(count.ops.values())
        print(f"{name:9s} {wall:6.2f} s, {sum(n for _, n in outs)} tokens, {n_forwards} forwards, {ops} aten ops "
              f"({ops / max(n_forwards, 1):.0f} per forward); most: "
              + ", ".join(f"{k.replace('aten.', '')} {v}" for k, v in count.ops.most_common(6)))


if __name__ == "__main__":
    main()
