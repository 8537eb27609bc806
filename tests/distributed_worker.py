"""One rank of a multi-process rollout, started by tests/test_distributed.py (under torchrun, or as plain processes
with RANK/WORLD_SIZE set): the tiny policy rolls out a few questions into a file through `rollout_to_file`.

Each rank records how many chains it appended (only rank 0 may write) in OUT.rank<R>.json. `--die-after N` makes
rank 1 kill itself (SIGKILL) at its N-th generate call, as a crashed or OOM-killed rank would."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from conftest import TOKENIZER_DIR, ToyRetriever
from rag_dpo import distributed
from rag_dpo.agent import rollout as rollout_module
from rag_dpo.agent.policy import tiny_policy
from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
from rag_dpo.errors import InputError
from rag_dpo.records import Corpus, Passage, Question


def build(n_questions: int = 6, cache: str = "none"):
    """The questions and rollout engine every rank (and the one-process reference in the test) uses."""
    corpus = Corpus([Passage(f"p{i}", f"Title {i}", f"Passage number {i} says something.") for i in range(6)])
    questions = [Question(f"q{i}", f"What is thing {i}?", [f"thing {i}"], [f"p{i}"]) for i in range(n_questions)]
    model, tok = tiny_policy(TOKENIZER_DIR)
    cfg = RolloutConfig(max_new_tokens=6, max_steps=3, batch_size=2, do_sample=True, progress=False, cache=cache)
    return questions, RolloutEngine(model, tok, ToyRetriever(corpus), corpus, cfg, model_name="tiny")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--die-after", type=int, default=0)
    ap.add_argument("--cache", default="none")
    args = ap.parse_args()
    torch.set_num_threads(1)
    distributed.init_from_env()
    rank = distributed.rank()
    questions, engine = build(args.questions, args.cache)

    appended = []
    real_append = rollout_module.append_chains
    rollout_module.append_chains = lambda path, chains: (appended.extend(c.question_id for c in chains),
                                                         real_append(path, chains))[1]
    if args.die_after and rank == 1:
        real_gen, calls = engine.generate_steps, []

        def generate_then_die(reqs, sample):
            calls.append(1)
            if len(calls) >= args.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_gen(reqs, sample)
        engine.generate_steps = generate_then_die
    try:
        engine.rollout_to_file(questions, args.out)
    except (distributed.DistributedError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({"rank": rank, "world": distributed.world_size(),
                                                               "appended": appended}))


if __name__ == "__main__":
    main()
