"""Rank awareness for multi-process launches (`torchrun`, `accelerate launch`): which rank this is, a deterministic
shard of a stage's questions, gathering results back into their original order, and barriers between stages.

Design decisions:
- torch.distributed does the work (process group, all_gather_object, barrier); accelerate and TRL join the same
  group when training starts. No scheduler of our own: every rank takes `items[rank::world]`, so which rank does
  what depends only on the list and the world size, and gathering interleaves the shards back into list order.
- The group is initialised from the launcher's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...) when WORLD_SIZE > 1
  and nobody has done it yet: gloo on CPU, nccl on CUDA (each rank then uses GPU LOCAL_RANK). Without a GPU it also
  sets ACCELERATE_USE_CPU, else accelerate (and so TRL's trainers) would see DistributedType.NO and train each rank
  alone instead of as DDP over gloo.
- With one process every helper is a no-op (and torch.distributed is never touched), so the single-process path is
  exactly what it was.
- A collective that fails (a peer rank died, or stalled past the timeout) raises `DistributedError`: one line
  naming the stage and this rank, instead of a gloo traceback. The timeout is RAG_DPO_DIST_TIMEOUT_S seconds
  (default 1800: a rank may wait at a barrier while another finishes a long shard).
- `run_sharded` is the shared loop of the resumable stages (rollouts, tree search, annotation): every rank reads what
  is already in the file, runs its shard in rounds, and only rank 0 appends each round's gathered results in list
  order. It deals whole batches (the stage's batch size) rather than single items, so every batch holds the same
  questions as in a one-process run: seeding per question alone is not enough, since batched float32 kernels round
  differently with other batch mates (other padding), which can flip a sampled token (seen in a SmolLM2 tree search).
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died or did not arrive within the timeout."""


def _timeout_s() -> float:
    return float(os.environ.get("RAG_DPO_DIST_TIMEOUT_S", "1800"))


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _dist():
    """torch.distributed when a group is (or can be) initialised, else None (one process)."""
    if _env_world() <= 1:
        import sys
        dist = sys.modules.get("torch.distributed")   # initialised by someone else without WORLD_SIZE: still honour it
        return dist if dist is not None and dist.is_available() and dist.is_initialized() else None
    init_from_env()
    import torch.distributed as dist
    return dist


def init_from_env() -> bool:
    """Initialise the default process group from the launcher's environment when WORLD_SIZE > 1 (no-op otherwise,
    or when it is already initialised). Returns whether a multi-process group is active."""
    if _env_world() <= 1:
        return False
    import torch
    import torch.distributed as dist
    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE={_env_world()} but this torch build has no torch.distributed")
    if dist.is_initialized():
        return dist.get_world_size() > 1
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif not deepspeed_launch():   # accelerate (so TRL / transformers' Trainer) treats a CPU launch as one process
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")   # unless told it is MULTI_CPU
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=_timeout_s()))
    atexit.register(_destroy_group)
    return dist.get_world_size() > 1


def _destroy_group() -> None:
    """Tear the group down before the interpreter does: a gloo group left to static destructors can abort the exiting
    rank ("terminate called without an active exception"), which the launcher reports as a failed run."""
    import torch.distributed as dist
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:   # a peer already gone: nothing left to tear down cleanly, and the exit status is set elsewhere
        pass


def deepspeed_launch() -> bool:
    """True under `accelerate launch` with a DeepSpeed config. The run must then not be declared a CPU run
    (ACCELERATE_USE_CPU, TrainingArguments.use_cpu), even without CUDA: transformers would set up plain DDP while
    ZeRO-3's zero.Init has already partitioned the weights, and every forward would see empty tensors."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def is_main() -> bool:
    """Rank 0: the only rank that writes files, bars, reports and wandb runs."""
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's deterministic slice: the items whose index modulo the world size is this rank."""
    return list(items[rank()::world_size()])


def _failed(stage: str, op: str, e: Exception) -> DistributedError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return DistributedError(f"{stage}: rank {rank()} of {world_size()}: {op} failed, a peer rank died or did not "
                            f"arrive within {_timeout_s():.0f} s (see the other ranks' logs; a rerun resumes) "
                            f"[{first}]")


def gather_objects(local: Sequence[T], stage: str = "gather") -> list[T]:
    """Every rank's `shard(...)` results (one per item of its shard) back in the original item order, on every
    rank. With one process: `list(local)`."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return list(local)
    parts: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(parts, list(local))
    except Exception as e:   # gloo/nccl raise RuntimeError (DistBackendError) on a lost peer or a timeout
        raise _failed(stage, "gathering results", e) from None
    out = []
    for i in range(max(len(p) for p in parts)):   # shard r holds items r, r + world, ...: interleave them back
        out.extend(p[i] for p in parts if i < len(p))
    return out


def all_reduce_sum(tensor, stage: str = "all-reduce"):
    """Sum `tensor` over the ranks in place (every rank gets the total) and return it; no-op with one process.
    Rows computed by one rank and left 0 on the others add up to the whole tensor, bit for bit."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return tensor
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    except Exception as e:
        raise _failed(stage, "summing over the ranks", e) from None
    return tensor


def barrier(stage: str = "barrier") -> None:
    """Wait for every rank (no-op with one process), e.g. so no rank reads a file rank 0 is still writing."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return
    try:
        dist.barrier()
    except Exception as e:
        raise _failed(stage, "the barrier", e) from None


def _dealt(n: int, r: int, world: int, unit: int) -> list[int]:
    """Indices rank r takes of n items when whole batches of `unit` go round the ranks, so each batch is the one a
    single process would run (batched float32 kernels round differently for other batch mates, which can flip a
    sampled token)."""
    unit = max(1, unit)
    return [i for b in range(r * unit, n, world * unit) for i in range(b, min(b + unit, n))]


def map_sharded(items: Sequence[T], fn: Callable[[list[T]], Iterable], stage: str, unit: int = 1) -> list:
    """`fn(items)` (one result per item, in order) computed across the ranks: whole batches of `unit` items go round
    them, and every rank gets every result back in item order. With one process: `list(fn(items))`. For stages
    whose loop needs all results on every rank (e.g. sampling rounds that depend on what was sampled)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return list(fn(list(items)))
    index = _dealt(len(items), dist.get_rank(), dist.get_world_size(), unit)
    local = list(fn([items[i] for i in index])) if index else []
    out: list = [None] * len(items)
    for part in gather_objects([list(zip(index, local))], stage):
        for i, x in part:
            out[i] = x
    return out


def run_sharded(todo: Sequence[T], chunks: Callable[[list[T]], Iterable[list]], write: Callable[[list], None],
                stage: str, unit: int = 1) -> None:
    """Run a resumable stage over `todo` on every rank and write its results from rank 0 only.

    `chunks(items)` yields lists of results, one result per item, in item order (any chunk sizes); `write(results)`
    appends them. With one process: `write` each chunk as it comes. With several, the consecutive batches of `unit`
    items (the stage's own batch size) are dealt round the ranks (unit 1 = `shard(todo)`); every round gathers each
    rank's next chunk, and rank 0 writes the results that continue todo's order without
    a gap, so the file always holds a prefix of todo (a killed run resumes cleanly). Rounds go on until every rank
    is done; a barrier ends the stage so later readers see the whole file."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        for results in chunks(list(todo)):
            write(results)
        return
    r, world = dist.get_rank(), dist.get_world_size()
    index = _dealt(len(todo), r, world, unit)
    mine = [todo[i] for i in index]
    it: Iterator[list] = iter(chunks(mine)) if mine else iter(())
    sent, finished, pending, next_index = 0, False, {}, 0
    while True:
        results = None if finished else next(it, None)
        finished = results is None
        indexed = [(index[sent + i], x) for i, x in enumerate(results or [])]
        sent += len(indexed)
        parts: list = [None] * world
        try:
            dist.all_gather_object(parts, (finished, indexed))
        except Exception as e:   # gloo/nccl raise RuntimeError (DistBackendError) on a lost peer or a timeout
            raise _failed(stage, "gathering results", e) from None
        if r == 0:
            for _, got in parts:
                pending.update(got)
            ready = []
            while next_index in pending:
                ready.append(pending.pop(next_index))
                next_index += 1
            if ready:
                write(ready)
        if all(done for done, _ in parts):
            break
    barrier(stage)
