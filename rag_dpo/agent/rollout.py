"""The batched multi-turn rollout engine: runs the search agent over many questions at once.

One *step* is one generation call for every active row together, stopped per row at `</search>`, `</answer>` or
eos; then one batched retrieval for every row that searched, and the observation is appended. The context of every
row is built with `protocol.tokenize_path`, so a rollout sees exactly the tokens the trainers later see, and the
recorded spans are the trainers' masks.

Design decisions:
- Keys/values are reused (`cache: prefix`, `CachedHFBackend` + `kv_cache`): a step prefills only the tokens no
  earlier step, sibling or question has already encoded (its context grows by a step and an observation, tree
  search samples K siblings of one prefix, every question shares the system prompt). Re-encoding everything was
  about three quarters of rollout time on a CPU. `cache: none` (`HFBackend`, transformers `generate` over the whole
  context) is kept as the reference the cached engine is tested and benchmarked against (docs/throughput.md).
  The default is whichever measured faster on the machine (`default_cache`): reuse on a CPU, `generate` on CUDA,
  where the cached loop's per-token decode ran at 0.64-0.72x `generate`'s tokens/s (H200, docs/throughput.md).
- Sampling is seeded per row, not per batch: each generated step gets its own `torch.Generator` seeded from
  (seed, question id, step id), and that row's tokens are drawn from it. So a chain does not depend on which other
  chains share its batch, and a resumed `rollout_to_file` writes the same chains as an uninterrupted run.
- A chain ends at an answer, at an invalid step (recorded with its parse error; we do not let the policy retry,
  so eval counts protocol failures instead of hiding them), or at `max_steps`.
- `sample_next_steps` and `continue_from` always sample (K identical greedy siblings would be useless);
  `rollout` samples only with `do_sample`.
- A vLLM backend is used when `backend="vllm"` (imported lazily; never required; unmeasured here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rag_dpo.agent import protocol
from rag_dpo.records import ANSWER, INVALID, SEARCH, Chain, Corpus, Question, Step, append_chains, done_question_ids


@dataclass
class RolloutConfig:
    max_steps: int = 4                 # steps per chain (searches + the answer); a chain without an answer ends here
    k: int = 3                         # passages retrieved per search
    max_new_tokens: int = 64           # generation budget of one step
    temperature: float = 0.7           # sampling temperature (when sampling)
    top_p: float = 0.95                # nucleus sampling mass (when sampling)
    do_sample: bool = False            # `rollout`: sample (True) or greedy (False); siblings are always sampled
    batch_size: int = 16               # rows per generate call; `rollout` also runs questions in chunks of this size
    seed: int = 0                      # base of the per-row seeds
    max_tokens_per_passage: int = 64   # token budget of each retrieved passage in an observation
    backend: str = "auto"              # "hf" (transformers), "vllm" (needs vllm + a GPU), "auto" (vllm when usable)
    cache: str = dataclasses.field(default_factory=lambda: default_cache())
                                       # hf: "prefix" reuses keys/values across steps and siblings; "none" re-encodes;
                                       # "auto" (and the default): the measured-faster one here (`default_cache`)
    cache_mb: int = 1024               # byte budget of the prefix store (least recently used blocks leave first)
    decode_rows: int | None = None     # cached backend: rows decoding together (memory); None: 64 bf16, 32 fp32
    progress: bool = True              # show a tqdm progress bar
    banned: tuple = ()                 # strings a step may never contain, masked at generation (e.g. "<score" for
                                       # a self-evaluating policy: docs/variants.md); () bans nothing

    def __post_init__(self):
        if self.cache == "auto":    # recorded resolved, so a run folder says which engine ran
            self.cache = default_cache()


def default_cache() -> str:
    """The engine that measured faster on this machine's kind: key/value reuse ("prefix", 3.3-6.6x `generate` on
    the 2-core CPU) without CUDA; full re-encoding with transformers `generate` ("none") where CUDA is available (on
    an H200 with SmolLM2 the cached bf16 loop ran at 0.64-0.72x float32 `generate`'s tokens/s: on a GPU, prefill is
    cheap and the decode loop's per-token cost decides; docs/throughput.md). Decided by CUDA being available, as
    `resolve_device("auto")` decides the device: set `cache` explicitly to run the other one."""
    import torch
    return "none" if torch.cuda.is_available() else "prefix"


def banned_ids(tokenizer, banned: Sequence[str]) -> list[list[int]]:
    """Token ids of each banned string as a step would hold it (segment-wise, like every protocol segment)."""
    return [tokenizer(b, add_special_tokens=False)["input_ids"] for b in banned if b]


def ban_mask(logits, tails: Sequence[Sequence[int]], sequences: Sequence[Sequence[int]]) -> None:
    """Set -inf, in place, on the token that would complete a banned sequence after each row's tail (its context
    and generated tokens so far): transformers' `bad_words_ids` rule, for the cached engine's own loop."""
    for seq in sequences:
        head, last = list(seq[:-1]), seq[-1]
        for j, tail in enumerate(tails):
            if not head or list(tail[len(tail) - len(head):]) == head:
                logits[j, last] = float("-inf")


def row_seed(seed: int, question_id: str, step_id: str, sample: int = 0) -> int:
    """A 63-bit seed for one generated step, independent of batch composition; `sample` tells apart several
    chains of one question sampled together (sample 0 keeps the single-chain seed)."""
    key = f"{seed}|{question_id}|{step_id}" + (f"|{sample}" if sample else "")
    h = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def resolve_device(name: str | None = "auto") -> str:
    """'auto' = cuda when available, else cpu."""
    if name in (None, "auto"):
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str | None = "auto", device: str = "cpu"):
    """Inference dtype. 'auto' = bfloat16 on a GPU that supports it or on a CPU with native bf16 matmuls
    (AMX / AVX512-BF16: SmolLM2 generation measured 2.3x faster than float32), else float32."""
    import torch
    if name not in (None, "auto"):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
        except KeyError:
            from rag_dpo.errors import InputError
            raise InputError(f"unknown dtype {name!r} (auto, float32, bfloat16, float16)", field="dtype") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32


def resolve_backend(name: str, model=None) -> str:
    """'auto' = vllm when it is installed, a GPU is there and the policy is a plain model (the vLLM backend loads
    weights by path and takes no adapters), else hf. vLLM is unmeasured in this project (see docs/throughput.md)."""
    if name in ("hf", "vllm"):
        return name
    if name != "auto":
        from rag_dpo.errors import InputError
        raise InputError(f"unknown backend {name!r} (auto, hf or vllm)", field="backend")
    import importlib.util
    if importlib.util.find_spec("vllm") is None or hasattr(model, "peft_config") or isinstance(model, str):
        return "hf"
    import torch
    return "vllm" if torch.cuda.is_available() else "hf"


def _next_id(chain: Chain) -> int:
    nums = [int(s.id) for s in chain.steps if s.id.isdigit()]
    return max(nums) + 1 if nums else len(chain.steps)


@dataclass
class _Request:
    """One step to generate: the path before it and the identity of the new step."""
    question_id: str
    question: str
    prefix: list[Step]
    step_id: str
    parent: str | None
    sample: int = 0        # which of a question's chains sampled in one batch (`rollout(samples=n)`)


def seeded_sample(scores, gens: Sequence, temperature: float, top_p: float, shortlist: int | None = None):
    """One token per row, drawn from that row's own generator (temperature + top-p): [rows, 1] token ids.

    `shortlist` = k takes the nucleus from the top-k instead of sorting the whole vocabulary, for the rows whose
    top-k mass already exceeds top_p (then the nucleus lies inside it and the draw is identical); other rows sort."""
    import torch
    probs = torch.softmax(scores.float() / max(float(temperature), 1e-5), dim=-1)
    u = torch.stack([torch.rand((), generator=g) for g in gens]).to(probs.device)
    tokens = torch.empty((probs.shape[0], 1), dtype=torch.long, device=probs.device)
    short = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
    if shortlist and top_p < 1.0 and shortlist < probs.shape[-1]:
        top_p_vals, top_ids = probs.topk(shortlist, dim=-1)
        short = top_p_vals.sum(-1) > top_p
        if short.any():
            tokens[short] = _nucleus_pick(top_p_vals[short], top_ids[short], u[short], top_p)
    if not short.all():
        rest = ~short
        sorted_p, order = torch.sort(probs[rest], dim=-1, descending=True)
        tokens[rest] = _nucleus_pick(sorted_p, order, u[rest], top_p)
    return tokens


def _nucleus_pick(sorted_p, order, u, top_p: float):
    """Inverse-CDF draw with uniforms `u` over probabilities sorted in descending order, cut to the top-p nucleus."""
    import torch
    cum = sorted_p.cumsum(-1)
    if top_p < 1.0:
        sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p, 0.0)
        cum = sorted_p.cumsum(-1)
    idx = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(-1).contiguous()).clamp_max(cum.shape[-1] - 1)
    return order.gather(-1, idx)


class _SeededSampler:
    """Logits processor: draws each row's token from that row's own generator (temperature + top-p) and returns
    one-hot scores, so `generate` in greedy mode emits exactly the sampled token."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        import torch
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, float(top_p)

    def __call__(self, input_ids, scores):
        import torch
        tokens = seeded_sample(scores, self.gens, self.temperature, self.top_p)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, tokens, 0.0)
        return out


class _PrefillTimer:
    """No-op logits processor whose first call marks the end of `generate`'s prefill (for the time split)."""

    def __init__(self):
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


class HFBackend:
    """transformers `generate` over the whole context at every call: left-padded batches, stop strings per row.
    The reference engine (`cache: none`): the cached backend is measured and tested against it."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.timing = new_timing()

    def generate(self, contexts: list[list[int]], seeds: list[int], sample: bool, cfg: RolloutConfig
                 ) -> list[tuple[str, int]]:
        """(text, generated token count) per context; text is cut after the first stop tag."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = self.model.device
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, width - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[i, width - len(c):] = 1
        gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=pad, eos_token_id=tok.eos_token_id,
                                   stop_strings=protocol.STOP_STRINGS,
                                   bad_words_ids=banned_ids(tok, cfg.banned) or None)
        timer = _PrefillTimer()
        processors = LogitsProcessorList([timer] + ([_SeededSampler(seeds, cfg.temperature, cfg.top_p)]
                                                    if sample else []))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=gen_cfg, logits_processor=processors, tokenizer=tok)
        t1 = time.perf_counter()
        self.timing["prefill_seconds"] += (timer.first or t1) - t0
        self.timing["decode_seconds"] += t1 - (timer.first or t1)
        self.timing["prefill_tokens"] += sum(len(c) for c in contexts)
        return step_texts(tok, out[:, width:].tolist(), {pad, tok.eos_token_id})

    def clear(self) -> None:
        """Nothing is kept between calls."""


def step_texts(tokenizer, rows: list[list[int]], stop_ids: set) -> list[tuple[str, int]]:
    """(text cut after the first stop tag, generated token count incl. a final eos) per row of new token ids."""
    results = []
    for row in rows:
        n = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
        text = protocol.truncate_at_stop(tokenizer.decode(row[:n], skip_special_tokens=True))
        results.append((text, n + (1 if n < len(row) and row[n] == tokenizer.eos_token_id else 0)))
    return results


def new_timing() -> dict:
    """A backend's running time split: prefill vs decode seconds, tokens prefilled and tokens served from cache."""
    return {"prefill_seconds": 0.0, "decode_seconds": 0.0, "prefill_tokens": 0, "cached_tokens": 0}


class CachedHFBackend:
    """A decode loop of its own over the model's forward, with key/value reuse (`kv_cache`): each context prefills
    only the tokens the prefix store does not hold, identical contexts (siblings) are prefilled once and expanded,
    rows that finish leave the batch, and every row's keys/values go back to the store for its next step.

    Same outputs as `HFBackend` (greedy: argmax; sampled: the same per-row seeded draw, `seeded_sample`), same
    stopping (eos/pad, `</search>`, `</answer>`, `max_new_tokens`); `shortlist` avoids sorting the vocabulary."""

    SHORTLIST = 256

    def __init__(self, model, tokenizer, cache_mb: int = 1024, block: int = 16):
        from rag_dpo.agent import cpu_attention
        from rag_dpo.agent.kv_cache import PrefixStore, cache_kwarg
        self.model, self.tokenizer = model, tokenizer
        self.store = PrefixStore(block, int(cache_mb) << 20)
        c = model.config
        self.layers = c.num_hidden_layers
        self.heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = {self.pad, tokenizer.eos_token_id}
        # A stop string ends with ">", so the tail is only decoded after a token that holds one.
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.tag_ids = {i for i, t in enumerate(pieces) if t and ">" in t}
        self.cache_kw = cache_kwarg(model)
        # rows decoding together unless `decode_rows` says: the same batch-cache bytes, half the rows in float32
        self.default_rows = 32 if next(model.parameters()).element_size() > 2 else 64
        self.cpu_attention = cpu_attention.applies(model)      # half precision on a CPU: SDPA is the slow part
        self.timing = new_timing()

    def clear(self) -> None:
        """Forget every stored key/value (call after the weights change)."""
        self.store.clear()

    def generate(self, contexts: list[list[int]], seeds: list[int], sample: bool, cfg: RolloutConfig
                 ) -> list[tuple[str, int]]:
        """Continuous batching: contexts enter in groups of `batch_size // 2` distinct contexts (with all their
        rows), a group whenever the decode batch has room for it (`decode_rows`, at least one group), and leave
        as they finish, so the batch stays wide instead of draining to its slowest rows."""
        import torch

        from rag_dpo.agent.kv_cache import BatchCache
        groups = self._groups(contexts, max(1, cfg.batch_size // 2))
        room = max(self.decode_rows(cfg), len(groups[0]) if groups else 0)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds] if sample else None
        out: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        live: list[int] = []            # batch row -> request
        cache = logits = pos = None
        banned = banned_ids(self.tokenizer, cfg.banned)
        width = max((len(b) for b in banned), default=0)       # tokens of a row's tail a ban can depend on
        with torch.inference_mode():
            while groups or live:
                if groups and (not live or len(live) + len(groups[0]) <= room):
                    t0 = time.perf_counter()
                    admit = []
                    while groups and (not admit and not live or len(live) + len(admit) + len(groups[0]) <= room):
                        admit += groups.pop(0)
                    new_logits, new_cache, new_pos, rows = self._prefill([contexts[r] for r in admit],
                                                                         cfg.max_new_tokens)
                    admit = [admit[j] for j in rows]     # the prefill's batch rows, in its order
                    if cache is None:
                        cache, logits, pos = new_cache, new_logits, new_pos
                    else:
                        cache = BatchCache.concat(cache, new_cache, max(cache.length, new_cache.length)
                                                  + cfg.max_new_tokens)
                        logits, pos = torch.cat([logits, new_logits]), torch.cat([pos, new_pos])
                    live += admit
                    self.timing["prefill_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                if banned:
                    ban_mask(logits, [list(contexts[r][-width:]) + out[r][-width:] for r in live], banned)
                if sample:
                    picked = seeded_sample(logits, [gens[r] for r in live], cfg.temperature, cfg.top_p,
                                           shortlist=self.SHORTLIST).squeeze(1).tolist()
                else:
                    picked = logits.argmax(-1).tolist()
                for r, t in zip(live, picked):
                    if done[r]:        # finished, waiting to leave the batch: its token is not part of its step
                        continue
                    out[r].append(t)
                    done[r] = (t in self.stop_ids or len(out[r]) >= cfg.max_new_tokens
                               or (t in self.tag_ids and self._stopped(out[r])))
                finished = [j for j, r in enumerate(live) if done[r]]
                leaving = 4 * len(finished) >= len(live) or (          # a quarter done (or all), or room made
                    finished and groups and len(live) - len(finished) + len(groups[0]) <= room)
                if leaving:
                    self._store(cache, contexts, out, [(j, live[j]) for j in finished])
                    keep = [j for j, r in enumerate(live) if not done[r]]
                    live, picked, pos = [live[j] for j in keep], [picked[j] for j in keep], pos[keep]
                    if not live:
                        cache = logits = pos = None
                        self.timing["decode_seconds"] += time.perf_counter() - t0
                        continue
                    cache.select(torch.tensor(keep, device=cache.valid.device))
                cache.valid[:, cache.length] = torch.tensor([not done[r] for r in live], device=cache.valid.device)
                logits = self._forward(torch.tensor(picked).unsqueeze(1), pos.unsqueeze(1), cache, 1)
                pos = pos + 1
                self.timing["decode_seconds"] += time.perf_counter() - t0
        return step_texts(self.tokenizer, out, self.stop_ids)

    def decode_rows(self, cfg: RolloutConfig) -> int:
        """Rows decoding together: `cfg.decode_rows`, else 64 in bf16 and 32 in float32."""
        return int(cfg.decode_rows or self.default_rows)

    @staticmethod
    def _groups(contexts: list[list[int]], distinct: int) -> list[list[int]]:
        """Request indices in groups of at most `distinct` different contexts; a context's rows stay together when
        they are adjacent (the caller sorts by context)."""
        groups: list[list[int]] = []
        where: dict[tuple, int] = {}
        count = 0
        for i, c in enumerate(contexts):
            key = tuple(c)
            if groups and where.get(key) == len(groups) - 1:
                groups[-1].append(i)
                continue
            if not groups or count >= distinct:
                groups.append([])
                count = 0
            groups[-1].append(i)
            where[key] = len(groups) - 1
            count += 1
        return groups

    def _forward(self, ids, positions, cache, q: int):
        """Logits of the last column after feeding q new columns to every row (half precision on a CPU: through
        `cpu_attention`)."""
        from rag_dpo.agent import cpu_attention
        dev = self.model.device
        mask = cache.mask(q, self.model.dtype)
        with cpu_attention.using(self.model) if self.cpu_attention else contextlib.nullcontext():
            out = self.model(input_ids=ids.to(dev), attention_mask=mask, position_ids=positions.to(dev),
                             use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        cache.length += q
        return out.logits[:, -1].float()

    PREFILL_PAD = 0.02      # a prefill forward pads each row's new tokens to the longest; split above this share
    PREFILL_MIN_ROWS = 4    # ... but never into forwards of fewer rows (each forward has a fixed cost)

    def _prefill(self, contexts: list[list[int]], max_new: int):
        """The uncached tail of every distinct context, right-aligned (see `kv_cache`); identical contexts are
        prefilled once and expanded. Tails are sorted by length and fed in as few forwards as keep padding under
        `PREFILL_PAD` (one forward pads every row to the longest tail: 16 % of the eval's prefilled tokens were
        padding). Returns (last logits, cache, next position) per batch row, the context each row belongs to, and
        stores the contexts' new full blocks."""
        import torch

        unique: dict[tuple, int] = {}
        row_of = [unique.setdefault(tuple(c), len(unique)) for c in contexts]
        ctxs = list(unique)
        hits = [self.store.lookup(c) for c in ctxs]
        shared = self._shared_prefix(ctxs, hits)
        if shared:          # e.g. the system prompt of a fresh engine: encode it once, then every row reuses it
            self._prefill_part([tuple(ctxs[0][:shared])], [self.store.lookup(ctxs[0][:shared])],
                               self._batch_cache(1, shared))
            hits = [self.store.lookup(c) for c in ctxs]
        tails = [len(c) - n for c, (n, _) in zip(ctxs, hits)]
        parts: list[list[int]] = []
        for i in sorted(range(len(ctxs)), key=lambda i: (tails[i], i)):
            if parts:
                part = parts[-1]
                padded = tails[i] * (len(part) + 1)       # the part's tails padded to this one, its longest
                padding = padded - sum(tails[j] for j in part) - tails[i]
                if len(part) < self.PREFILL_MIN_ROWS or padding <= self.PREFILL_PAD * padded:
                    part.append(i)
                    continue
            parts.append([i])
        if len(parts) > 1 and len(parts[-1]) < self.PREFILL_MIN_ROWS:   # a short last part joins the one before
            last = parts.pop()
            parts[-1] += last
        parts = [sorted(part) for part in parts]       # one part = the contexts' own order (the same rounding)
        width = max(len(c) for c in ctxs)
        cache = self._batch_cache(len(ctxs), width + max_new)
        logits, row = [], 0
        for part in parts:      # each part right-aligned in its own rows of the batch cache, as narrow as it is
            part_width = max(len(ctxs[i]) for i in part)
            logits.append(self._prefill_part([ctxs[i] for i in part], [hits[i] for i in part],
                                              cache.view(slice(row, row + len(part)), width - part_width)))
            row += len(part)
        cache.length = width
        logits = torch.cat(logits)
        order = [i for part in parts for i in part]     # batch row -> distinct context
        pos = torch.tensor([len(ctxs[i]) for i in order], dtype=torch.long)
        # Rows stay in part order (reordering them would copy the whole cache); identical contexts expand in place.
        where = {i: k for k, i in enumerate(order)}
        requests = sorted(range(len(contexts)), key=lambda r: where[row_of[r]])
        rows = [where[row_of[r]] for r in requests]
        if rows != list(range(len(order))):
            sel = torch.tensor(rows, device=logits.device)
            cache.select(sel)
            logits, pos = logits[sel], pos[sel.cpu()]
        return logits, cache, pos, requests

    def _batch_cache(self, rows: int, capacity: int):
        from rag_dpo.agent.kv_cache import BatchCache
        cache = BatchCache(self.layers, rows, self.heads, capacity, self.head_dim, self.model.dtype, self.model.device)
        cache.whole = self.cpu_attention        # its attention reads whole contiguous layers
        return cache

    def _shared_prefix(self, ctxs: list[tuple], hits: list) -> int:
        """Tokens (whole blocks) that every context begins with but at least two of them would each prefill; 0
        when encoding them once first saves nothing."""
        if len(ctxs) < 2:
            return 0
        block, first = self.store.block, ctxs[0]
        n = min(len(c) for c in ctxs) - 1                  # the last token of a context is always prefilled
        for c in ctxs[1:]:
            i = 0
            while i < n and c[i] == first[i]:
                i += 1
            n = i
        n = n // block * block
        return n if sum(h < n for h, _ in hits) >= 2 else 0

    def _prefill_part(self, ctxs: list[tuple], hits: list, cache):
        """One forward over the uncached tails of distinct contexts, right-aligned in `cache` (one row each, at
        least as many columns as the longest context); their last logits, in their order."""
        import torch

        width = max(len(c) for c in ctxs)
        q = max(len(c) - n for c, (n, _) in zip(ctxs, hits))
        start = width - q
        ids = torch.full((len(ctxs), q), self.pad, dtype=torch.long)
        positions = torch.zeros((len(ctxs), q), dtype=torch.long)
        keep = torch.zeros((len(ctxs), q), dtype=torch.bool)
        for i, (c, (n, blocks)) in enumerate(zip(ctxs, hits)):
            m, lo = len(c) - n, width - len(c)
            if n:
                cache.write_row(i, lo, torch.cat(blocks, dim=3))
                keep[i, max(lo - start, 0):lo + n - start] = True
            ids[i, q - m:] = torch.tensor(c[n:], dtype=torch.long)
            positions[i, q - m:] = torch.arange(n, len(c))
            cache.valid[i, lo:width] = True
            self.timing["prefill_tokens"] += m
            self.timing["cached_tokens"] += n
        cache.length = start
        cache.keep = keep[:, None, :, None].to(self.model.device) if keep.any() else None
        logits = self._forward(ids, positions, cache, q)
        cache.keep = None
        for i, (c, (n, _)) in enumerate(zip(ctxs, hits)):
            self.store.insert(c, cache.row(i, slice(width - (len(c) - n), width)), n)
        return logits

    def _stopped(self, tokens: list[int]) -> bool:
        tail = self.tokenizer.decode(tokens[-12:], skip_special_tokens=True)
        return any(s in tail for s in protocol.STOP_STRINGS)

    def _store(self, cache, contexts, out, rows) -> None:
        """Put each (batch row, request) row's generated keys/values in the store: the next step's context begins
        with them whenever re-tokenising the step's text gives the same tokens."""
        block = self.store.block
        for j, r in rows:
            seq = list(contexts[r]) + out[r][:-1]      # the last picked token was never fed
            start = len(contexts[r]) // block * block
            if len(seq) // block * block <= start:
                continue
            cols = cache.valid[j].nonzero().squeeze(1)[start:len(seq)]
            self.store.insert(seq, cache.row(j, cols), start)


class VLLMBackend:
    """vLLM offline engine (GPU; unmeasured here: it cannot be installed on the project's GPU machine). The same
    contract as the hf backends: one request per row with that row's seed (so sampling does not depend on batch
    composition), the protocol's stop strings, the step's token budget; greedy rows ask for temperature 0."""

    def __init__(self, model_path: str, tokenizer, llm=None):
        if llm is None:
            from vllm import LLM  # optional dependency, imported only when asked for
            llm = LLM(model=model_path, tokenizer=model_path, seed=0)
        self.llm, self.tokenizer = llm, tokenizer
        self.timing = new_timing()

    @staticmethod
    def requests(contexts, seeds, sample: bool, cfg: RolloutConfig):
        """(prompts, sampling params) for `LLM.generate`, one per row."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature if sample else 0.0,
                                 top_p=cfg.top_p if sample else 1.0, seed=int(s) if sample else None,
                                 stop=list(protocol.STOP_STRINGS), include_stop_str_in_output=True,
                                 **({"bad_words": list(cfg.banned)} if cfg.banned else {}))
                  for s in seeds]
        return [TokensPrompt(prompt_token_ids=list(c)) for c in contexts], params

    def generate(self, contexts, seeds, sample, cfg):
        t0 = time.perf_counter()
        prompts, params = self.requests(contexts, seeds, sample, cfg)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        self.timing["decode_seconds"] += time.perf_counter() - t0      # vLLM does not split prefill from decode
        return [(protocol.truncate_at_stop(o.outputs[0].text), len(o.outputs[0].token_ids)) for o in outs]

    def clear(self) -> None:
        """vLLM manages its own prefix cache."""


class RolloutEngine:
    """Runs the agent: `rollout`, `sample_next_steps`, `continue_from`, `rollout_to_file`."""

    def __init__(self, model, tokenizer, retriever, corpus: Corpus, cfg: RolloutConfig | None = None,
                 model_name: str | None = None, retriever_name: str | None = None):
        self.model, self.tokenizer, self.retriever, self.corpus = model, tokenizer, retriever, corpus
        self.cfg = cfg or RolloutConfig()
        self.model_name = model_name or (model if isinstance(model, str) else
                                         getattr(getattr(model, "config", None), "_name_or_path", "")) or ""
        self.retriever_name = retriever_name or getattr(retriever, "name", type(retriever).__name__)
        backend = resolve_backend(self.cfg.backend, model)
        if backend == "vllm":
            path = getattr(getattr(model, "config", None), "_name_or_path", None) or self.model_name
            self.backend = VLLMBackend(path, tokenizer)
        elif self.cfg.cache == "none":
            self.backend = HFBackend(model, tokenizer)
        elif self.cfg.cache == "prefix":
            self.backend = CachedHFBackend(model, tokenizer, self.cfg.cache_mb)
        else:
            from rag_dpo.errors import InputError
            raise InputError(f"unknown cache {self.cfg.cache!r} (prefix, none or auto)", field="cache")
        self.backend_name = backend
        self.reset_stats()

    def clear_cache(self) -> None:
        """Drop stored keys/values: call after the model's weights change (PPO updates, merging an adapter)."""
        self.backend.clear()

    def reset_stats(self) -> None:
        """Zero the counters and the time split (a benchmark's clean slate after a warm-up)."""
        self.stats = {"steps": 0, "generated_tokens": 0, "seconds": 0.0, "retrieval_seconds": 0.0}
        self.backend.timing = new_timing()

    def time_split(self) -> dict:
        """Seconds in prefill, decode, retrieval and the rest (tokenising, parsing, bookkeeping) so far."""
        t = self.backend.timing
        rest = self.stats["seconds"] - t["prefill_seconds"] - t["decode_seconds"] - self.stats["retrieval_seconds"]
        return {"prefill": t["prefill_seconds"], "decode": t["decode_seconds"],
                "retrieval": self.stats["retrieval_seconds"], "rest": max(rest, 0.0),
                "prefill_tokens": t["prefill_tokens"], "cached_tokens": t["cached_tokens"]}

    # ---- the building block: one step for many rows ---------------------------------------------------------
    def generate_steps(self, requests: list[_Request], sample: bool) -> list[Step]:
        """Generate, parse and observe one step per request (batched in `batch_size` rows)."""
        t0 = time.perf_counter()
        contexts = [protocol.tokenize_path(self.tokenizer, r.question, r.prefix).input_ids for r in requests]
        seeds = [row_seed(self.cfg.seed, r.question_id, r.step_id, r.sample) for r in requests]
        outputs = self.generate_texts(contexts, seeds, sample)
        steps = []
        for r, (text, n_tokens) in zip(requests, outputs):
            parsed = protocol.parse_step(text)
            steps.append(Step(id=r.step_id, parent=r.parent, text=text, action=parsed.action, query=parsed.query,
                              answer=parsed.answer, parse_error=parsed.error, generated_tokens=n_tokens))
        self.observe(steps)
        for r, s in zip(requests, steps):
            tp = protocol.tokenize_path(self.tokenizer, r.question, r.prefix + [s])
            s.policy_span = list(tp.step_spans[-1])
            s.info_span = list(tp.info_spans[-1]) if tp.info_spans[-1] is not None else None
        self.stats["steps"] += len(steps)
        self.stats["generated_tokens"] += sum(s.generated_tokens for s in steps)
        self.stats["seconds"] += time.perf_counter() - t0
        return steps

    def generate_texts(self, contexts: list[list[int]], seeds: list[int], sample: bool,
                       max_new_tokens: int | None = None) -> list[tuple[str, int]]:
        """(text, generated tokens) per token context, in batches of similar length (less padding; the order
        depends on the contexts only). `max_new_tokens` overrides the config's budget.

        A batch holds `batch_size` rows; the cached backend takes every context in one call and batches
        continuously, admitting `batch_size // 2` *distinct* contexts at a time (siblings share one prefill)."""
        cfg = self.cfg if max_new_tokens is None else dataclasses.replace(self.cfg, max_new_tokens=max_new_tokens)
        if isinstance(self.backend, CachedHFBackend):   # identical contexts side by side: one group, one prefill
            batches = [sorted(range(len(contexts)), key=lambda i: (len(contexts[i]), contexts[i], i))]
        else:
            bs = max(1, self.cfg.batch_size)
            order = sorted(range(len(contexts)), key=lambda i: (len(contexts[i]), i))
            batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        outputs: list = [None] * len(contexts)
        for rows in batches:
            for i, res in zip(rows, self.backend.generate([contexts[i] for i in rows], [seeds[i] for i in rows],
                                                          sample, cfg)):
                outputs[i] = res
        return outputs

    def observe(self, steps: list[Step]) -> None:
        """One batched retrieval for every search step; fills retrieved_ids and observation."""
        searches = [s for s in steps if s.action == SEARCH]
        if not searches:
            return
        t0 = time.perf_counter()
        hits = self.retriever.search([s.query for s in searches], self.cfg.k)
        self.stats["retrieval_seconds"] += time.perf_counter() - t0
        for s, h in zip(searches, hits):
            s.retrieved_ids = [pid for pid, _ in h]
            passages = [self.corpus[pid] for pid in s.retrieved_ids if pid in self.corpus]
            s.observation = protocol.format_observation(passages, self.tokenizer, self.cfg.max_tokens_per_passage)

    def new_chain(self, q: Question) -> Chain:
        return Chain(question_id=q.id, question=q.question, gold_answers=list(q.answers),
                     supporting_ids=list(q.supporting_ids), model=self.model_name, retriever=self.retriever_name,
                     method="agent", sampling=self.sampling_meta())

    def sampling_meta(self) -> dict:
        c = self.cfg
        return {"do_sample": c.do_sample, "temperature": c.temperature, "top_p": c.top_p, "seed": c.seed,
                "max_new_tokens": c.max_new_tokens, "max_steps": c.max_steps, "k": c.k,
                "max_tokens_per_passage": c.max_tokens_per_passage, "backend": self.backend_name}

    @staticmethod
    def is_terminal(step: Step) -> bool:
        return step.action in (ANSWER, INVALID)

    # ---- public API ----------------------------------------------------------------------------------------
    def rollout(self, questions: Sequence[Question], samples: int = 1) -> list[Chain]:
        """`samples` paths per question (greedy or sampled per `do_sample`), batched across questions and samples:
        PPO's group of chains per question shares one batch (on a CPU a wider batch generates faster). Returned in
        sample-major order: every question's sample 0, then every question's sample 1, ..."""
        return [c for chunk in self._iter_rollout(questions, samples=samples) for c in chunk]

    def rollout_to_file(self, questions: Sequence[Question], path: str | Path) -> Path:
        """Resumable: skips questions already in `path`, appends each finished chunk of chains whole. Under a
        multi-process launch every rank rolls out its shard and rank 0 alone appends, in question order
        (rag_dpo.distributed.run_sharded); a chain is seeded per question, so when it does not depend on its batch
        mates the file equals a one-process run's."""
        from rag_dpo.distributed import is_main, run_sharded
        path = Path(path)
        done = done_question_ids(path)
        todo = [q for q in questions if q.id not in done]
        progress, self.cfg.progress = self.cfg.progress, self.cfg.progress and is_main()
        try:
            run_sharded(todo, lambda qs: self._iter_rollout(qs, already=len(questions) - len(todo)),
                        lambda chains: append_chains(path, chains), stage="rollout", unit=self.questions_per_call())
        finally:
            self.cfg.progress = progress
        return path

    def questions_per_call(self, siblings: int = 1) -> int:
        """Chains generated together: `batch_size`, or with the cached backend enough to fill `decode_rows`."""
        if isinstance(self.backend, CachedHFBackend):
            return max(1, max(self.cfg.batch_size, self.backend.decode_rows(self.cfg)) // max(1, siblings))
        return max(1, self.cfg.batch_size // max(1, siblings))

    def _iter_rollout(self, questions: Sequence[Question], already: int = 0, samples: int = 1):
        from tqdm.auto import tqdm
        items = [(q, j) for j in range(max(1, samples)) for q in questions]
        bar = tqdm(total=len(items) + already, initial=already, unit="chain", desc="rollout",
                   disable=not self.cfg.progress)
        t0, steps0, tok0 = time.perf_counter(), self.stats["steps"], self.stats["generated_tokens"]
        try:
            bs = self.questions_per_call()
            for b in range(0, len(items), bs):
                chains = [self.new_chain(q) for q, _ in items[b:b + bs]]
                sample_of = {id(c): j for c, (_, j) in zip(chains, items[b:b + bs])}
                active = list(chains)
                for t in range(self.cfg.max_steps):
                    if not active:
                        break
                    reqs = [_Request(c.question_id, c.question, list(c.steps), str(t),
                                     c.steps[-1].id if c.steps else None, sample_of[id(c)]) for c in active]
                    for c, s in zip(active, self.generate_steps(reqs, sample=self.cfg.do_sample)):
                        c.add_step(s)
                    active = [c for c in active if not self.is_terminal(c.steps[-1])]
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(steps_s=f"{(self.stats['steps'] - steps0) / dt:.2f}",
                                    tok_s=f"{(self.stats['generated_tokens'] - tok0) / dt:.1f}")
                for c in chains:
                    c.selected = c.steps[-1].id if c.steps else None
                bar.update(len(chains))
                yield chains
        finally:
            bar.close()

    def sample_next_steps(self, items: Sequence[tuple[Chain, str | None]], n: int) -> list[list[Step]]:
        """n sampled alternative next steps (with observations) after each (chain, parent step id) prefix.

        The steps get ids unique within their chain and `parent` set; the caller adds them to the tree."""
        counters: dict[int, int] = {}
        reqs = []
        for chain, parent in items:
            prefix = chain.path(parent) if parent is not None else []
            base = counters.setdefault(id(chain), _next_id(chain))
            for j in range(n):
                reqs.append(_Request(chain.question_id, chain.question, prefix, str(base + j), parent))
            counters[id(chain)] = base + n
        steps = self.generate_steps(reqs, sample=True)
        return [steps[i * n:(i + 1) * n] for i in range(len(items))]

    def continue_from(self, items: Sequence[tuple[Chain, str | None]], n: int) -> list[list[list[Step]]]:
        """n sampled continuations (to an answer, an invalid step or `max_steps`) after each (chain, step id)
        prefix, all advanced together one step at a time. A prefix that already ended yields empty lists."""
        counters: dict[int, int] = {}
        states = []   # (chain, prefix, continuation) per (item, j)
        for chain, step_id in items:
            prefix = chain.path(step_id) if step_id is not None else []
            counters.setdefault(id(chain), _next_id(chain))
            for _ in range(n):
                states.append((chain, prefix, []))
        while True:
            active = [st for st in states
                      if len(st[1]) + len(st[2]) < self.cfg.max_steps
                      and not ((st[2] or st[1]) and self.is_terminal((st[2] or st[1])[-1]))]
            if not active:
                break
            reqs = []
            for chain, prefix, cont in active:
                path = prefix + cont
                new_id = counters[id(chain)]
                counters[id(chain)] += 1
                reqs.append(_Request(chain.question_id, chain.question, path, str(new_id),
                                     path[-1].id if path else None))
            for (_, _, cont), s in zip(active, self.generate_steps(reqs, sample=True)):
                cont.append(s)
        out = []
        for i in range(len(items)):
            out.append([st[2] for st in states[i * n:(i + 1) * n]])
        return out


def config_dict(cfg: RolloutConfig) -> dict:
    """The settings as recorded in run folders: `banned` only when set, so folders from before it still resume."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "banned" or v}


def rollout_dataset(data_path: str | Path, out_path: str | Path, corpus_path: str | Path | None = None,
                    policy: str = "smollm2", split: str = "train", limit: int | None = None,
                    retriever: str = "bm25", cfg: RolloutConfig | None = None, device: str = "auto",
                    dtype: str = "float32") -> Path:
    """`rag-dpo rollout`: load questions (one split) and a corpus, run the agent, append chains to `out_path`
    (resumable: a rerun skips the questions already there)."""
    from rag_dpo.agent.policy import load_policy
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.errors import InputError
    from rag_dpo.retrieval import build_retriever

    ds = load_dataset(data_path, corpus=corpus_path)
    if ds.corpus is None:
        raise InputError("this file has no context paragraphs; pass --corpus", file=str(data_path), field="corpus")
    questions = split_questions(ds.questions, split)[:limit]
    device = resolve_device(device)
    model, tok = load_policy(policy, device=device, dtype=resolve_dtype(dtype, device))
    engine = RolloutEngine(model, tok, build_retriever(retriever, ds.corpus), ds.corpus, cfg or RolloutConfig(),
                           model_name=policy, retriever_name=retriever)
    return engine.rollout_to_file(questions, out_path)
