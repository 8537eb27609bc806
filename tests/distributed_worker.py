"""One rank of a multi-process run, started by tests/test_distributed.py (under torchrun, or as plain processes with
RANK/WORLD_SIZE set). Jobs, any number per launch, each into its own OUT:
`--stages OUT`: the tiny policy rolls out a few questions (`rollout_to_file`, into OUT), tree searches them
(`tree_search_to_file`, evidence annotator, OUT.tree.jsonl) and the rollouts are annotated (`annotate_file`,
OUT.labels.jsonl).
`--eval DATA OUT` runs the eval stage (`evaluate`, direct + agent, on DATA's questions, into folder OUT).
`--ppo POLICY OUT` runs one PPO round (`train_ppo`) from the saved tiny policy into folder OUT and saves what each
rank ends with (the round's token ids, the trained LoRA and value-head weights) as OUT.rank<R>.safetensors.
`--compare OUT` runs `run_compare` with test_compare's fake backend (every train/evaluate call checks, through a
collective, that all ranks are on the same arm) into folder OUT and records each rank's work and writes.
`--sft POLICY OUT` trains SFT (TRL, so DDP under torchrun) for 2 steps of a global batch of 4 and saves the LoRA
weights the same way.

For each job each rank records which questions it appended to which file (only rank 0 may write) and what the job
returned in OUT.rank<R>.json.
`--die-after N` makes rank 1 kill itself (SIGKILL) at its N-th rollout generate call, as a crashed or OOM-killed
rank would."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

from conftest import TOKENIZER_DIR, ToyRetriever
from rag_dpo import distributed
from rag_dpo.agent.policy import tiny_policy
from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
from rag_dpo.annotate.annotators import EvidenceAnnotator, annotate_file
from rag_dpo.annotate.tree_search import TreeSearchConfig, tree_search_to_file
from rag_dpo.errors import InputError
from rag_dpo.records import Corpus, Passage, Question


def build(n_questions: int = 8, cache: str = "none"):
    """The questions and rollout engine every rank (and the one-process reference in the test) uses."""
    corpus = Corpus([Passage(f"p{i}", f"Title {i}", f"Passage number {i} says something.") for i in range(6)])
    questions = [Question(f"q{i}", f"What is thing {i}?", [f"thing {i}"], [f"p{i}"]) for i in range(n_questions)]
    model, tok = tiny_policy(TOKENIZER_DIR)
    cfg = RolloutConfig(max_new_tokens=6, max_steps=3, batch_size=2, do_sample=True, progress=False, cache=cache)
    return questions, RolloutEngine(model, tok, ToyRetriever(corpus), corpus, cfg, model_name="tiny")


def run_stages(questions, engine, out: Path) -> None:
    """rollouts -> out, tree search -> out.tree.jsonl, rollouts annotated -> out.labels.jsonl."""
    engine.rollout_to_file(questions, out)
    tree_search_to_file(questions, engine, EvidenceAnnotator(), f"{out}.tree.jsonl",
                        TreeSearchConfig(k=2, batch_questions=2, progress=False))
    annotate_file(out, EvidenceAnnotator(), f"{out}.labels.jsonl", progress=False)


def run_eval(data: Path, out: Path, model_and_tokenizer=None) -> dict:
    """The eval stage on the tiny policy: 5 questions in batches of 2, so the ranks get 2 and 1 batches."""
    from rag_dpo.eval.evaluate import evaluate
    cfg = RolloutConfig(max_new_tokens=4, max_steps=2, batch_size=2, progress=False)
    return evaluate(data, policy="tiny", methods="direct,agent", split="all", limit=5, out_dir=out, rollout=cfg,
                    model_and_tokenizer=model_and_tokenizer or tiny_policy(TOKENIZER_DIR), use_wandb=False)


class StepLengthValues:
    """Process rewards that vary on the tiny random model (whose steps never parse, so every real annotator gives
    0 and PPO would not move): each step's value is its text length mod 5, scaled to [0, 1]."""
    name = "evidence"

    def annotate(self, chains):
        from rag_dpo.records import Label
        for c in chains:
            for s in c.steps:
                v = (len(s.text) % 5) / 4
                s.labels["evidence"] = Label(v, v >= 0.5, "evidence")
        return chains


def run_ppo(policy: Path, out: Path) -> dict:
    """One PPO round (critic, process rewards) on 4 of 6 questions x 2 samples, 2 minibatches of 4 chains: returns
    the round's padded token ids and the trainable weights after the update (LoRA + value head)."""
    from rag_dpo.train.ppo import PPOInputs, PPOSettings, PPOTrainer, train_ppo
    questions, engine = build(n_questions=6)
    inputs = PPOInputs(questions, engine.corpus, engine.retriever,
                       {"max_new_tokens": 6, "max_steps": 3, "batch_size": 4, "cache": "none"}, StepLengthValues())
    cfg = PPOSettings(algorithm="ppo", reward="process", iterations=1, questions_per_iteration=4, group_size=2,
                      ppo_epochs=1, minibatch_size=4, learning_rate=1e-3, precision="fp32", wandb=False)
    tr = PPOTrainer(cfg, str(policy))
    seen = {}
    real_update = tr.update

    def recording_update(ro):
        seen["input_ids"] = ro.input_ids.clone()
        return real_update(ro)
    tr.update = recording_update
    train_ppo(cfg, inputs, out, str(policy), trainer=tr)
    trained = {f"policy.{n}": p.detach().clone() for n, p in tr.unwrapped().named_parameters() if p.requires_grad}
    head = tr.accelerator.unwrap_model(tr.value_head)
    trained.update({f"value_head.{n}": p.detach().clone() for n, p in head.named_parameters()})
    return {"input_ids": seen["input_ids"], **trained}


def run_sft(policy: Path, out: Path) -> dict:
    """2 optimizer steps of TRL SFT, 1 row per device and 4 accumulation steps on one process (a global batch of
    4: train.common.global_batch_accumulation halves the accumulation on 2 ranks), on 8 rows of different lengths."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from rag_dpo.agent.protocol import format_step, render_prompt
    from rag_dpo.pairs import chain_text
    from rag_dpo.records import ANSWER, SEARCH, Step
    from rag_dpo.train.sft import SFTSettings, train_sft
    tok = AutoTokenizer.from_pretrained(str(policy))
    rows = []
    for i in range(8):
        s0 = Step("0", None, format_step("Look it up." * (1 + i % 3), SEARCH, f"thing {i}"), SEARCH, query=f"thing {i}",
                  observation=f"<information>Passage {i} says thing {i} is {i * 7}.</information>")
        s1 = Step("1", "0", format_step("Found it.", ANSWER, str(i * 7)), ANSWER, answer=str(i * 7))
        text, spans = chain_text([s0, s1])
        rows.append({"prompt": render_prompt(tok, f"What is thing {i}?"), "completion": text,
                     "completion_info_spans": spans})
    cfg = SFTSettings(max_steps=2, learning_rate=5e-3, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                      logging_steps=1, save_steps=10, precision="fp32", wandb=False)
    train_sft(cfg, Dataset.from_list(rows), out, model=str(policy))
    from rag_dpo.agent.policy import load_policy
    model, _ = load_policy(str(out))
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def run_compare_lockstep(out: Path) -> dict:
    """run_compare on the fake backend; returns what this rank trained, evaluated and wrote."""
    from test_compare import FakeBackend

    from rag_dpo.pipeline import compare, compare_report
    from rag_dpo.pipeline.compare import CompareConfig, run_compare

    class LockstepBackend(FakeBackend):
        def _together(self, work: str) -> None:
            names = distributed.gather_objects([work], "compare test")
            if len(set(names)) != 1:
                raise RuntimeError(f"ranks ran different work at once: {names}")

        def train(self, run, question_ids, budget, out_dir):
            self._together(run.slug)
            return super().train(run, question_ids, budget, out_dir)

        def evaluate(self, name, policy, out_dir):
            self._together(name)
            return super().evaluate(name, policy, out_dir)

    written: list[str] = []
    real_write, real_report = compare.atomic_write_json, compare_report.write_report

    def recording_write(path, obj):
        written.append(str(Path(path).relative_to(out)))
        return real_write(path, obj)

    def recording_report(data, out_dir, name, **kw):
        written.append(f"report{'(partial)' if data.get('planned_runs') else ''}")
        return real_report(data, out_dir, name, **kw)
    compare.atomic_write_json, compare_report.write_report = recording_write, recording_report
    cfg = CompareConfig(name="t", run_dir=str(out / "runs"), out_dir=str(out / "results"), n_boot=200, seeds=[0],
                        ablation_seeds=[], curve_seeds=[])   # the 5 main arms, one seed
    cfg.validate()
    backend = LockstepBackend()
    try:
        run_compare(cfg, backend, progress=False)
    finally:
        compare.atomic_write_json, compare_report.write_report = real_write, real_report
    return {"trained": backend.trained, "evaluated": backend.evaluated, "written": written}


def _record_appends() -> dict[str, list[str]]:
    """Wrap every stage module's append_chains (once per process) so this rank records which questions it appended to
    which file; the caller empties the returned dict between jobs."""
    appended: dict[str, list[str]] = {}
    for name in ("rag_dpo.agent.rollout", "rag_dpo.annotate.tree_search", "rag_dpo.annotate.annotators",
                 "rag_dpo.eval.evaluate"):
        module = importlib.import_module(name)   # (rag_dpo.annotate re-exports a function named tree_search)

        def recording_append(path, chains, _real=module.append_chains):
            chains = list(chains)
            appended.setdefault(Path(path).name, []).extend(c.question_id for c in chains)
            _real(path, chains)
        module.append_chains = recording_append
    return appended


def _stages(out: Path, die_after: int, cache: str) -> None:
    questions, engine = build(cache=cache)
    if die_after and distributed.rank() == 1:
        real_gen, calls = engine.generate_steps, []

        def generate_then_die(reqs, sample):
            calls.append(1)
            if len(calls) >= die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_gen(reqs, sample)
        engine.generate_steps = generate_then_die
    run_stages(questions, engine, out)


def main() -> None:
    """Runs each job given (in this order: stages, eval, sft, ppo, compare) in one launch: a launch costs ~15 s of
    imports on 2 cores, most of what these tests spend, so test_distributed shares launches between its tests."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", metavar="OUT")
    ap.add_argument("--eval", nargs=2, metavar=("DATA", "OUT"))
    ap.add_argument("--sft", nargs=2, metavar=("POLICY", "OUT"))
    ap.add_argument("--ppo", nargs=2, metavar=("POLICY", "OUT"))
    ap.add_argument("--compare", metavar="OUT")
    ap.add_argument("--die-after", type=int, default=0)
    ap.add_argument("--cache", default="none")
    args = ap.parse_args()
    torch.set_num_threads(1)
    distributed.init_from_env()
    rank = distributed.rank()
    jobs = []
    if args.stages:
        jobs.append((Path(args.stages), lambda out: _stages(out, args.die_after, args.cache)))
    if args.eval:
        jobs.append((Path(args.eval[1]), lambda out: run_eval(Path(args.eval[0]), out)))
    for flag, run in (("sft", run_sft), ("ppo", run_ppo)):
        if getattr(args, flag):
            def train(out, policy=Path(getattr(args, flag)[0]), run=run):
                from safetensors.torch import save_file
                tensors = run(policy, out)
                save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}.rank{rank}.safetensors")
            jobs.append((Path(getattr(args, flag)[1]), train))
    if args.compare:
        jobs.append((Path(args.compare), run_compare_lockstep))
    appended = _record_appends()
    for out, job in jobs:
        appended.clear()
        try:
            results = job(out)
        except (distributed.DistributedError, InputError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        Path(f"{out}.rank{rank}.json").write_text(json.dumps({"rank": rank, "world": distributed.world_size(),
                                                              "appended": appended, "results": results}))


if __name__ == "__main__":
    main()
