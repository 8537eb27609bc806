"""The outcome-only arms' data: whole chains sampled independently per question, with no annotator, on a generated-
token budget matched to the step-level pool's.

Why a separate pool: outcome-level arms (SFT, outcome-DPO) that learn from a tree search's paths learn from paths
the process annotator chose to continue, so "outcome-only" would see step labels through the back door. Here
every chain is an i.i.d. sample of the policy from the question prompt (one chain per round, round r seeded from
(seed, r), so chains never depend on which other questions share a batch, and a rerun continues identically).
Each chain is labelled by the `outcome` annotator (its final-answer F1; an invalid step or the step limit is F1 0),
which costs nothing and reads no step label.

Matching: question q gets chains until its generated tokens reach the step pool's spend on q (policy tokens plus
what the step annotator generated, e.g. Monte-Carlo continuations). With r tokens left and m the pool's mean chain
length so far, q samples another chain if r >= m, and with probability r / m if 0 < r < m (a seeded draw per
question and chain), so its expected total is its target: totals match in expectation on any subset of questions
(the budget curve), not only on all of them. (A deterministic rule such as "stop when the tokens plus half a
chain reach the target" undershot by 11 % in the quick compare: with 1-3 chains per question the stopping chain is
the long one.) `max_chains` caps a question whose chains are very short.

Resumable: each round's chains are appended whole; a rerun counts what every question already has and goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from rag_dpo.records import Chain, Question, append_chains, read_chains


def chain_tokens(chain: Chain) -> int:
    return sum(s.generated_tokens for s in chain.steps)


def wants_more(spent: float, chains: int, target: float, max_chains: int, mean_len: float | None, u: float) -> bool:
    """Sample another chain for a question that has `chains` chains costing `spent` tokens, for `target` tokens?
    `mean_len`: the pool's mean chain length so far (None before any chain); `u`: a uniform draw in [0, 1)."""
    left = target - spent
    if chains >= max_chains or left <= 0:
        return False
    if not mean_len or left >= mean_len:
        return True
    return u < left / mean_len


def draw(seed: int, question_id: str, chain: int) -> float:
    """The seeded uniform draw that decides whether question `question_id` samples chain number `chain`."""
    import hashlib
    h = hashlib.sha256(f"pool-stop|{seed}|{question_id}|{chain}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2 ** 64


def round_seed(seed: int, r: int) -> int:
    """The rollout seed of round r of pool `seed` (the same scheme as the recipe pipeline's sampled chains)."""
    return seed * 1009 + r


def sample_matched_pool(questions: Sequence[Question], engine, out_path: str | Path, targets: Mapping[str, float],
                        seed: int = 0, max_chains: int = 32, progress: bool = True) -> Path:
    """Sample whole chains per question (engine.rollout, sampling on) until each question's generated tokens match
    `targets[question id]`; label them with the outcome annotator; append to `out_path` (resumable). Under a
    multi-process launch each round's batches go round the ranks (`distributed.map_sharded`), every rank sees every
    chain (the next round depends on them) and rank 0 alone appends."""
    from tqdm.auto import tqdm

    from rag_dpo.annotate.annotators import OutcomeAnnotator
    from rag_dpo.distributed import barrier, is_main, map_sharded
    from rag_dpo.io import repair_jsonl
    out_path = Path(out_path)
    spent: dict[str, int] = {q.id: 0 for q in questions}
    count: dict[str, int] = {q.id: 0 for q in questions}
    if out_path.exists() and is_main():
        repair_jsonl(out_path)
    barrier("outcome pool")
    if out_path.exists():
        for c in read_chains(out_path):
            if c.question_id in spent:
                spent[c.question_id] += chain_tokens(c)
                count[c.question_id] += 1
    total = float(sum(targets.get(q.id, 0.0) for q in questions))
    bar = tqdm(total=round(total), initial=min(round(total), sum(spent.values())), unit="tok",
               desc="i.i.d. chains (outcome pool)", disable=not progress or not is_main())
    annotator = OutcomeAnnotator()
    old_seed, old_sample = engine.cfg.seed, engine.cfg.do_sample
    engine.cfg.do_sample = True
    try:
        while True:
            n = sum(count.values())
            mean_len = sum(spent.values()) / n if n else None
            todo = [q for q in questions if wants_more(spent[q.id], count[q.id], targets.get(q.id, 0.0), max_chains,
                                                       mean_len, draw(seed, q.id, count[q.id]))]
            if not todo:
                break
            # questions that have the same number of chains sample their next one in one batched call
            groups = {}
            for q in todo:
                groups.setdefault(count[q.id], []).append(q)
            for r, group in sorted(groups.items()):
                engine.cfg.seed = round_seed(seed, r)

                def sample(qs, r=r):
                    chains = engine.rollout(qs)
                    for c in chains:
                        c.method = "sampled"
                        c.meta["pool"] = {"kind": "iid", "seed": seed, "round": r,
                                          "target_tokens": float(targets.get(c.question_id, 0.0))}
                    annotator.annotate(chains)
                    return chains
                chains = map_sharded(group, sample, "outcome pool", unit=getattr(engine.cfg, "batch_size", 1))
                if is_main():
                    append_chains(out_path, chains)
                for c in chains:
                    spent[c.question_id] += chain_tokens(c)
                    count[c.question_id] += 1
                    bar.update(chain_tokens(c))
    finally:
        engine.cfg.seed, engine.cfg.do_sample = old_seed, old_sample
        bar.close()
    if not out_path.exists() and is_main():
        from rag_dpo.records import write_chains
        write_chains(out_path, [])
    barrier("outcome pool")
    return out_path


def tokens_by_question(chains: Sequence[Chain], annotator: str | None) -> dict[str, float]:
    """Generated tokens per question: the policy's plus what `annotator`'s labels say it generated."""
    out: dict[str, float] = {}
    for c in chains:
        t = float(chain_tokens(c))
        if annotator:
            t += sum(float(s.labels[annotator].cost.get("generated_tokens", 0.0)) for s in c.steps
                     if annotator in s.labels)
        out[c.question_id] = out.get(c.question_id, 0.0) + t
    return out
