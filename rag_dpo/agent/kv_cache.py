"""Key/value reuse for the rollout engine: a block store of past keys and values shared across steps, siblings and
questions, and a preallocated batch cache the model writes into.

Why: an agent's context grows by one step and one observation at a time, tree search samples K siblings from one
prefix, and every question starts with the same system prompt. Re-encoding the whole context for every step was
about three quarters of rollout time on a CPU (issue 13's profile); with reuse only the new tokens are prefilled.

Design decisions:
- `PrefixStore` keeps keys/values in blocks of `block` tokens, each keyed by a digest of *all* tokens up to and
  including it, so a block is only reused after the identical prefix (vLLM's automatic prefix caching, in a
  dictionary). A lookup returns the longest run of stored blocks that starts a context; the rest is prefilled.
  Blocks past a byte budget are evicted least recently used; a block whose parent was evicted is never reached
  again and ages out. Siblings share their prefix's blocks, so a tree costs its distinct tokens, not paths x depth.
- `BatchCache` preallocates [2, batch, kv_heads, capacity, head_dim] per layer once per batch and writes each new
  token in place (a growing `torch.cat` cache copies the whole cache at every token). One tensor per layer, so a
  join or a row expansion copies a layer at a time instead of holding two whole batches. It implements the one call
  attention layers make (`update`), so any transformers decoder that takes a custom 4D mask works with it.
- Rows are right-aligned: [padding | cached part | new part], every row's context ending in the same column, so one
  forward serves them all and the width is the longest context, not longest cached + longest new part. The columns
  a prefill feeds (the longest new part) may hold another row's cached keys; `keep` protects those from being
  overwritten. Explicit position ids and a 4D additive mask make the holes exact (keys/values in the cache already
  carry their rotary positions, so where a row's tokens sit in the batch does not matter).
- A `whole` cache hands attention every preallocated column of a layer (the unwritten ones masked): a contiguous
  tensor, which the bf16 CPU attention (`cpu_attention`) multiplies without first copying a strided slice.
- Batches are continuous: `concat` joins a freshly prefilled group to the rows still decoding (each right-aligned
  to the same next column), so the decode batch stays wide instead of draining to its slowest rows.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch


class PrefixStore:
    """Least-recently-used store of key/value blocks; a block is a tensor [layers, 2, kv_heads, block, head_dim]."""

    def __init__(self, block: int = 16, max_bytes: int = 1 << 30):
        self.block = block
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def digests(self, tokens: Sequence[int], n_blocks: int) -> list[bytes]:
        """Chained digests of the first `n_blocks` full blocks: block i's key covers tokens[: (i + 1) * block]."""
        arr = np.asarray(tokens[: n_blocks * self.block], dtype=np.int64)
        out, h = [], b""
        for i in range(n_blocks):
            h = hashlib.blake2b(h + arr[i * self.block:(i + 1) * self.block].tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    def lookup(self, tokens: Sequence[int]) -> tuple[int, list[torch.Tensor]]:
        """(number of cached leading tokens, their blocks). At least one token is always left to prefill, since the
        next token's logits come from the last context position. Counts of served and prefilled tokens are the
        engine's (`time_split`: cached_tokens, prefill_tokens), where each context is counted once."""
        found = []
        for h in self.digests(tokens, (len(tokens) - 1) // self.block):
            t = self.blocks.get(h)
            if t is None:
                break
            self.blocks.move_to_end(h)
            found.append(t)
        n = len(found) * self.block
        return n, found

    def insert(self, tokens: Sequence[int], kv: torch.Tensor, start: int) -> None:
        """Store the full blocks of `tokens` that `kv` covers; kv [layers, 2, heads, n, dim] holds the keys/values of
        tokens[start:start + n], `start` a multiple of the block size."""
        assert start % self.block == 0
        n_blocks = (start + kv.shape[3]) // self.block
        for i, h in enumerate(self.digests(tokens, n_blocks)):
            if i * self.block < start:
                continue
            if h in self.blocks:
                self.blocks.move_to_end(h)
                continue
            lo = i * self.block - start
            t = kv[:, :, :, lo:lo + self.block].clone()
            self.blocks[h] = t
            self.bytes += t.numel() * t.element_size()
        while self.bytes > self.max_bytes and self.blocks:
            _, t = self.blocks.popitem(last=False)
            self.bytes -= t.numel() * t.element_size()

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0


class BatchCache:
    """Preallocated keys/values for one batch; duck-types the transformers cache (`update`, `get_seq_length`).

    One tensor per layer ([2, batch, kv_heads, capacity, head_dim]), not one for all layers: joining two batches
    (`concat`) or repeating rows (`select`) then builds the new cache a layer at a time and frees each old layer as
    it goes, so the copy never holds the old and the new batch whole (one tensor for all layers did: the bf16 tree
    search's peak memory was that copy, 752 MiB joined while its 455 + 273 MiB parts were alive)."""

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int, dtype, device):
        self.kv = [torch.zeros(2, batch, heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0          # columns written so far (the same for every row)
        self.keep = None         # [batch, 1, q, 1] bool during a prefill: columns that already hold cached keys
        self.whole = False       # attention reads every column, written or not (masked): no strided slice to copy

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def view(self, rows: slice, offset: int) -> "BatchCache":
        """A cache over some rows and the columns from `offset` on, sharing this one's storage: a prefill of a few
        rows writes straight into their place in the batch (no second allocation, no copy)."""
        out = BatchCache.__new__(BatchCache)
        out.kv, out.valid = [t[:, rows, :, offset:] for t in self.kv], self.valid[rows, offset:]
        out.length, out.keep, out.whole = 0, None, self.whole
        return out

    def row(self, i: int, cols) -> torch.Tensor:
        """Row i's keys/values at `cols` (a slice or index tensor) as one [layers, 2, kv_heads, n, head_dim] tensor,
        the prefix store's block layout."""
        return torch.stack([t[:, i, :, cols] for t in self.kv])

    def write_row(self, i: int, lo: int, kv: torch.Tensor) -> None:
        """Put kv [layers, 2, kv_heads, n, head_dim] (stored blocks) into row i from column lo on."""
        for t, src in zip(self.kv, kv):
            t[:, i, :, lo:lo + src.shape[2]] = src

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        s, q, layer = self.length, key_states.shape[2], self.kv[layer_idx]
        k, v = layer[0, :, :, s:s + q], layer[1, :, :, s:s + q]
        if self.keep is not None:
            key_states, value_states = torch.where(self.keep, k, key_states), torch.where(self.keep, v, value_states)
        k.copy_(key_states)
        v.copy_(value_states)
        if self.whole:
            return layer[0], layer[1]
        return layer[0, :, :, :s + q], layer[1, :, :, :s + q]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def mask(self, q: int, dtype) -> torch.Tensor:
        """Additive 4D mask [batch, 1, q, length + q] for the next q columns (every column when `whole`): a query
        sees valid keys up to its own column. A padding query sees nothing; it gets a finite minimum, not -inf, so no
        row turns NaN."""
        s = self.length
        width = self.valid.shape[1] if self.whole else s + q
        allowed = self.valid[:, None, :width].expand(-1, q, -1).clone()
        allowed[:, :, s + q:] = False
        if q > 1:
            allowed[:, :, s:s + q] &= torch.ones(q, q, dtype=torch.bool, device=allowed.device).tril()
        m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        m.masked_fill_(~allowed, torch.finfo(dtype).min)
        return m[:, None]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) the given rows, in that order: siblings expand one prefix; finished rows leave. Rows
        that only leave (ascending, no repeats) are moved up in place, so the batch never holds two copies; repeated
        rows are gathered a layer at a time."""
        r = rows.tolist()
        if all(a < b for a, b in zip(r, r[1:])):
            for dst, src in enumerate(r):
                if dst != src:
                    for t in self.kv:
                        t[:, dst] = t[:, src]
                    self.valid[dst] = self.valid[src]
            self.kv, self.valid = [t[:, :len(r)] for t in self.kv], self.valid[:len(r)]
            return
        for i, t in enumerate(self.kv):     # the old layer goes when the loop moves on: one layer held twice at most
            self.kv[i] = t.index_select(1, rows)
        self.valid = self.valid.index_select(0, rows)

    @staticmethod
    def concat(a: "BatchCache", b: "BatchCache", capacity: int) -> "BatchCache":
        """a's rows then b's, both right-aligned to the same next column, in a new cache of `capacity` columns,
        built a layer at a time; a and b are emptied as it goes (their layers freed), so do not use them after."""
        width = max(a.length, b.length)
        _, _, heads, _, dim = a.kv[0].shape
        dtype, device = a.kv[0].dtype, a.kv[0].device
        out = BatchCache(0, a.rows + b.rows, heads, capacity, dim, dtype, device)
        for i in range(len(a.kv)):
            layer = torch.zeros(2, a.rows + b.rows, heads, capacity, dim, dtype=dtype, device=device)
            for rows, src in ((slice(0, a.rows), a), (slice(a.rows, None), b)):
                layer[:, rows, :, width - src.length:width] = src.kv[i][:, :, :, :src.length]
                src.kv[i] = None                       # freed now, not when the whole join is done
            out.kv.append(layer)
        for rows, src in ((slice(0, a.rows), a), (slice(a.rows, None), b)):
            out.valid[rows, width - src.length:width] = src.valid[:, :src.length]
        out.length, out.whole = width, a.whole
        return out


def cache_kwarg(model) -> str:
    """The forward argument that takes a key/value cache: `cache` in newer transformers, else `past_key_values`."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def shared_prefix_logits(model, seqs: Sequence[Sequence[int]], positions: Sequence[int], pad_id: int,
                         batch_size: int = 8, share: bool = True, min_prefix: int = 16) -> torch.Tensor:
    """Logits at `positions[i]` of `seqs[i]` for every sequence ([n, outputs], float32), encoding the prefix all of
    them share once. Why: a best-of-N scorer (a PRM, the policy's self-score) reads N candidate steps that follow one
    context of hundreds of tokens; re-encoding that context per candidate was most of its time. The shared part goes
    through the model once (batch 1), its keys/values are repeated to each batch of candidates, and only the
    candidates' own tokens are encoded, right-padded after it. With `share` off, below `min_prefix` shared tokens, or
    when a requested position lies inside the shared part, every sequence is encoded whole (the same logits up to
    float rounding)."""
    import copy

    from transformers.cache_utils import DynamicCache
    n = len(seqs)
    if n == 0:
        return torch.zeros(0)
    dev = next(model.parameters()).device
    shared = min(min(positions), *(len(s) for s in seqs))
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < shared and s[k] == first[k]:
            k += 1
        shared = k
    cache, kw = None, cache_kwarg(model)
    if share and shared >= min_prefix and n > 1:
        cache = DynamicCache(config=getattr(model, "config", None))   # filled in place: a classifier's output
        with torch.no_grad():                                        # (the PRM's) does not hand its cache back
            model(input_ids=torch.tensor([list(first[:shared])], device=dev), use_cache=True, **{kw: cache})
    else:
        shared = 0
    out = []
    for i in range(0, n, batch_size):
        chunk = [list(s[shared:]) for s in seqs[i:i + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk], device=dev)
        mask = torch.tensor([[1] * (shared + len(s)) + [0] * (width - len(s)) for s in chunk], device=dev)
        kwargs = {}
        if cache is not None:
            past = copy.deepcopy(cache)            # a forward appends to the cache it is given
            past.batch_repeat_interleave(len(chunk))
            kwargs = {kw: past, "use_cache": True}
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
        at = torch.tensor([p - shared for p in positions[i:i + batch_size]], device=dev)
        out.append(logits[torch.arange(len(chunk), device=dev), at].float())
    return torch.cat(out)
