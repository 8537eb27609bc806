"""`rag-dpo eval`: score a policy with the baselines and the agent on one split; prints the results table."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rag_dpo.distributed import is_main


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("eval-latest")(eval_latest_cmd)


def eval_latest_cmd(runs: Path = typer.Option(Path("runs"), "--runs", help="Folder of recipe run folders."),
                    method: str = typer.Option("dpo", "--method", help="Which training runs count (dpo = make "
                                               "train-dpo, sft, ppo)."),
                    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated eval methods "
                                                          "(default: agent for a trained run; direct, rag, "
                                                          "iter-retgen, agent for the base model)."),
                    limit: Optional[int] = typer.Option(50, "--limit", help="First N questions of the split."),
                    out: Path = typer.Option(Path("runs/eval"), "--out", help="Output folder: one subfolder per "
                                             "policy (rerun to resume)."),
                    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
                    dtype: str = typer.Option("float32", "--dtype", help="Policy weights (float32 keeps a short "
                                              "fine-tune's change).")) -> None:
    """`make eval`: score the latest training run's trained policy and its warm start on the split that run held
    out (the base model on the dev split when there is no run); prints which policies were scored."""
    from rag_dpo.eval.latest import evaluate_latest
    from rag_dpo.eval.report import results_table
    sel, results = evaluate_latest(runs, method, methods, limit, out, device=device, dtype=dtype)
    if not is_main():
        return
    for name, res in results.items():
        print(f"\n## {name}: {sel.policies[name]}\n\n{results_table(res)}")
    print(f"\n{sel.describe()}\nwritten: {', '.join(str(out / n) for n in results)}")


def eval_cmd(data: Path = typer.Option(..., "--data", help="Question file (any format `rag-dpo data` reads)."),
             corpus: Optional[Path] = typer.Option(None, "--corpus", help="Corpus file (default: the union of the "
                                                   "file's own context paragraphs)."),
             policy: str = typer.Option("smollm2", "--policy", help="smollm2 (bundled), HF name/folder or a "
                                        "checkpoint / adapter folder."),
             methods: str = typer.Option("direct,rag,iter-retgen,agent", "--methods",
                                         help="Comma-separated: direct, rag, iter-retgen, agent, agent-hier, "
                                         "agent-prm-bon, agent-self-bon, agent-random-bon."),
             split: str = typer.Option("dev", "--split", help="train, dev, test or all."),
             fractions: Optional[str] = typer.Option(None, "--fractions", help="train,dev,test split fractions "
                                                     "(default 0.7,0.15,0.15); give a recipe's data.fractions to "
                                                     "score the split its run held out."),
             limit: Optional[int] = typer.Option(None, "--limit", help="First N questions of the split."),
             out: Path = typer.Option(Path("runs/eval"), "--out", help="Output folder (rerun to resume)."),
             retriever: str = typer.Option("bm25", "--retriever", help="bm25, bm25s, dense, hybrid, or a trained "
                                           "dense:PATH / rerank:PATH / hybrid:PATH (its training manifest is checked)."),
             k: Optional[int] = typer.Option(None, "--k", help="Passages per retrieval (default 3)."),
             seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (default 0)."),
             iter_rounds: int = typer.Option(2, "--iter-rounds", help="ITER-RETGEN rounds."),
             answer_tokens: int = typer.Option(32, "--answer-tokens", help="Baselines and the agent-hier "
                                               "synthesizer: token budget of an answer."),
             shots: int = typer.Option(0, "--shots", help="Baselines: worked examples before the question "
                                       "(0-2; for a model never trained on the answer format, e.g. the base model)."),
             device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda."),
             dtype: str = typer.Option("float32", "--dtype", help="Policy weights: float32, or auto (bf16 on GPUs "
                                       "and on CPUs with AMX/AVX512-BF16, else float32: faster, but bf16 rounding "
                                       "erases most of a short fine-tune's change), bfloat16, float16."),
             prm: Optional[str] = typer.Option(None, "--prm", help="agent-prm-bon: saved PRM folder."),
             bon_n: int = typer.Option(4, "--bon-n", help="agent-prm-bon, agent-self-bon, agent-random-bon: "
                                       "candidates per step."),
             manifest: Optional[Path] = typer.Option(None, "--manifest", help="Extra training manifest whose "
                                                     "questions must not be evaluated."),
             compare_with: Optional[Path] = typer.Option(None, "--compare-with", help="Another eval's "
                                                         "results.json: print deltas against it."),
             config: Optional[Path] = typer.Option(None, "--rollout-config", help="YAML with RolloutConfig fields."),
             overrides: List[str] = typer.Argument(None, help="RolloutConfig overrides key=value, e.g. "
                                                   "max_steps=4 max_new_tokens=48 batch_size=16.")) -> None:
    """Writes results.json, results.md, results.png and chains.jsonl into --out and prints the table. A policy
    from a recipe run (runs/<name>/trained or warm_start) is scored with that run's rollout budgets (and its split
    fractions when --data is the run's data file) unless options or key=value overrides say otherwise."""
    import json

    from rag_dpo.agent.rollout import RolloutConfig
    from rag_dpo.config import load_config
    from rag_dpo.errors import InputError
    from rag_dpo.eval.evaluate import evaluate
    from rag_dpo.eval.report import results_table

    baseline = None
    if compare_with is not None:
        try:
            baseline = json.loads(compare_with.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read results: {e}", file=str(compare_with)) from None
    base, fractions = _policy_run_settings(policy, data, fractions)
    rollout = load_config(RolloutConfig, config, list(overrides or []), base=base)
    results = evaluate(data, corpus_path=corpus, policy=policy, methods=methods, split=split, limit=limit,
                       out_dir=out, retriever=retriever, k=k, seed=seed, manifest=manifest, rollout=rollout,
                       iter_rounds=iter_rounds, answer_tokens=answer_tokens, shots=shots, device=device, dtype=dtype,
                       prm=prm, bon_n=bon_n, fractions=fractions, baseline_results=baseline,
                       baseline_name=compare_with.parent.name if compare_with else "baseline")
    if is_main():   # every rank has the results; one table
        print(results_table(results, baseline, compare_with.parent.name if compare_with else "baseline"))
        print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}, {out / 'chains.jsonl'}")


def _policy_run_settings(policy: str, data: Path, fractions: Optional[str]) -> tuple[dict, Optional[str]]:
    """(RolloutConfig defaults, split fractions) for `rag-dpo eval`: a recipe run's own when `policy` comes from
    one, so the same policy is not scored under other budgets than its run's (a self-evaluation policy scored EM
    0.193 at RolloutConfig's defaults and 0.161 at its recipe's, docs/comparison.md); else ({}, fractions)."""
    from rag_dpo.eval.latest import _resolve, policy_run, recipe_rollout
    found = policy_run(policy)
    if found is None:
        return {}, fractions
    run, recipe = found
    base = recipe_rollout(recipe)
    said = " ".join(f"{k}={v}" for k, v in base.items())
    run_data, run_fractions = (recipe.get("data") or {}).get("path"), (recipe.get("data") or {}).get("fractions")
    if fractions is None and run_fractions and run_data and \
            Path(_resolve(run_data)).resolve() == Path(data).resolve():
        fractions = run_fractions
        said += f"; split fractions {fractions}"
    if is_main():
        print(f"settings of {run / 'recipe.yaml'} (the run this policy comes from): {said}; options and "
              "key=value overrides win", flush=True)
    return base, fractions
