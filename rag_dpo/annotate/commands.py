"""`rag-dpo annotate`, `rag-dpo annotate-report`, `rag-dpo tree-search`, `rag-dpo sample-pool` and `rag-dpo oracle`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("annotate")(annotate)
    app.command("annotate-report")(annotate_report_cmd)
    app.command("tree-search")(tree_search_cmd)
    app.command("sample-pool")(sample_pool_cmd)
    app.command("oracle")(oracle_cmd)


def _config(config: Optional[Path], overrides: List[str], **opts):
    """AnnotatorConfig from an optional YAML + dotted overrides; explicit CLI options win."""
    from rag_dpo.annotate.annotators import AnnotatorConfig
    from rag_dpo.config import load_config
    extra = [f"{k}={v}" for k, v in opts.items() if v is not None]
    return load_config(AnnotatorConfig, config, list(overrides or []) + extra)


def _corpus(data: Optional[Path], corpus: Optional[Path]):
    from rag_dpo.errors import InputError
    if corpus is not None:
        from rag_dpo.data.corpus import load_corpus
        return load_corpus(corpus)
    if data is None:
        raise InputError("this needs a corpus to search: give --data (its context paragraphs) or --corpus",
                         field="corpus")
    from rag_dpo.data.loaders import load_dataset
    corp = load_dataset(data).corpus
    if corp is None:
        raise InputError("the data file has no corpus; give --corpus", file=str(data), field="corpus")
    return corp


def _engine(policy: str, corp, retriever: str, rollout_overrides: List[str]):
    """A RolloutEngine for `policy` searching `corp`."""
    from rag_dpo.agent.policy import load_policy
    from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
    from rag_dpo.config import load_config
    from rag_dpo.retrieval import build_retriever
    model, tok = load_policy(policy)
    cfg = load_config(RolloutConfig, None, rollout_overrides)
    return RolloutEngine(model, tok, build_retriever(retriever, corp), corp, cfg, model_name=policy,
                         retriever_name=retriever)


def annotate(chains: Path = typer.Option(..., "--chains", help="Chains JSONL (rollouts, tree-search or oracle)."),
             annotator: str = typer.Option(..., "--annotator", "-a",
                                           help="outcome, evidence, rollout, judge or prm."),
             out: Path = typer.Option(..., "--out", help="Labelled chains JSONL (appended; rerun to resume)."),
             policy: str = typer.Option("smollm2", "--policy", help="rollout: policy that continues prefixes."),
             data: Optional[Path] = typer.Option(None, "--data", help="rollout: question file whose corpus to search."),
             corpus: Optional[Path] = typer.Option(None, "--corpus", help="rollout: corpus file to search."),
             retriever: str = typer.Option("bm25", "--retriever", help="rollout: bm25, bm25s, dense or hybrid."),
             threshold: Optional[float] = typer.Option(None, "--threshold", help="good = value >= threshold."),
             gamma: Optional[float] = typer.Option(None, "--gamma", help="rollout: per-step discount."),
             rollouts: Optional[int] = typer.Option(None, "--rollouts", help="rollout: continuations per step."),
             judge_url: Optional[str] = typer.Option(None, "--judge-url", help="judge: OpenAI-compatible URL "
                                                     "(omit for a local HF judge)."),
             judge_model: Optional[str] = typer.Option(None, "--judge-model", help="judge: model name / HF path."),
             judge_key_env: Optional[str] = typer.Option(None, "--judge-key-env",
                                                         help="judge: NAME of the env variable with the API key."),
             prm: Optional[str] = typer.Option(None, "--prm", help="prm: saved PRM folder."),
             config: Optional[Path] = typer.Option(None, "--config", help="YAML with AnnotatorConfig fields."),
             rollout_set: List[str] = typer.Option([], "--rollout-set", help="RolloutConfig override key=value "
                                                   "(e.g. max_steps=4), repeatable."),
             overrides: List[str] = typer.Argument(None, help="AnnotatorConfig overrides, e.g. judge.timeout_s=30.")
             ) -> None:
    """Label every step of every chain with one annotator (resumable: rerun the same command after a kill)."""
    from rag_dpo.annotate.annotators import annotate_file, build_annotator
    cfg = _config(config, overrides, threshold=threshold, gamma=gamma, rollouts=rollouts, prm_path=prm,
                  **{"judge.url": judge_url, "judge.model": judge_model, "judge.api_key_env": judge_key_env})
    engine = _engine(policy, _corpus(data, corpus), retriever, rollout_set) if annotator == "rollout" else None
    ann = build_annotator(annotator, cfg, engine=engine)
    annotate_file(chains, ann, out)
    if getattr(ann, "parse_failures", 0):
        print(f"warning: {ann.parse_failures} judge replies did not parse (those candidates got 0.5)")
    print(f"wrote {out}")


def annotate_report_cmd(labels: List[Path] = typer.Option(..., "--labels", help="Labelled chains JSONL, repeatable."),
                        out: Path = typer.Option(Path("annotate_report"), "--out", help="Folder for report.md/png."),
                        no_wandb: bool = typer.Option(False, "--no-wandb", help="Do not log to wandb.")) -> None:
    """Label balance per annotator and Cohen's kappa between annotators on the same steps."""
    from rag_dpo.annotate.report import annotate_report
    rep = annotate_report(labels, out, wandb=not no_wandb)
    print(rep["markdown"])
    print(f"wrote {out}/report.md, {out}/report.png")


def tree_search_cmd(data: Path = typer.Option(..., "--data", help="Question file."),
                    out: Path = typer.Option(..., "--out", help="Chain trees JSONL (resumable)."),
                    annotator: str = typer.Option("evidence", "--annotator", "-a",
                                                  help="Scores candidates: evidence, rollout, judge or prm."),
                    policy: str = typer.Option("smollm2", "--policy"),
                    corpus: Optional[Path] = typer.Option(None, "--corpus"),
                    retriever: str = typer.Option("bm25", "--retriever"),
                    k: int = typer.Option(4, "--k", min=1, help="Candidates per prefix."),
                    final_k: Optional[int] = typer.Option(None, "--final-k", min=1, help="Candidates at the last step, "
                                                          "where the chain must answer (default: --k)."),
                    finish: bool = typer.Option(False, "--finish", help="Also sample every losing search step on "
                                                "to an answer (whole right/wrong chains for outcome pairs)."),
                    split: str = typer.Option("train", "--split", help="train, dev, test or all."),
                    limit: Optional[int] = typer.Option(None, "--limit"),
                    config: Optional[Path] = typer.Option(None, "--config", help="YAML with AnnotatorConfig fields."),
                    rollout_set: List[str] = typer.Option([], "--rollout-set", help="RolloutConfig key=value."),
                    overrides: List[str] = typer.Argument(None, help="AnnotatorConfig overrides.")) -> None:
    """RAG-Gym tree search: K candidates per prefix, scored, continue from the best."""
    from rag_dpo.annotate.annotators import build_annotator
    from rag_dpo.annotate.tree_search import TreeSearchConfig, tree_search_to_file
    questions, ds = _questions(data, corpus, split, limit)
    if ds.corpus is None:
        from rag_dpo.errors import InputError
        raise InputError("the data file has no corpus; give --corpus", file=str(data), field="corpus")
    engine = _engine(policy, ds.corpus, retriever, rollout_set)
    ann = build_annotator(annotator, _config(config, overrides), engine=engine)
    tree_search_to_file(questions, engine, ann, out, TreeSearchConfig(k=k, final_k=final_k, finish=finish))
    print(f"wrote {out}")


def sample_pool_cmd(data: Path = typer.Option(..., "--data", help="Question file (with its corpus)."),
                    match: Path = typer.Option(..., "--match", help="Labelled step pool (tree-search output) whose "
                                               "generated tokens per question the i.i.d. chains match."),
                    out: Path = typer.Option(..., "--out", help="i.i.d. chains JSONL (resumable)."),
                    annotator: Optional[str] = typer.Option(None, "--annotator", "-a", help="Whose label costs "
                                                            "count in the step pool's spend (default: its only one)."),
                    policy: str = typer.Option("smollm2", "--policy"),
                    corpus: Optional[Path] = typer.Option(None, "--corpus"),
                    retriever: str = typer.Option("bm25", "--retriever"),
                    seed: int = typer.Option(0, "--seed", help="Pool seed (round r samples with seed*1009+r)."),
                    max_chains: int = typer.Option(32, "--max-chains", help="Cap on chains per question."),
                    rollout_set: List[str] = typer.Option([], "--rollout-set", help="RolloutConfig key=value.")
                    ) -> None:
    """Outcome-only data: whole chains sampled independently per question (no annotator), per question as many
    generated tokens as the step pool `--match` spent there (its annotator's generation included)."""
    from rag_dpo.annotate.sampled_pool import sample_matched_pool, tokens_by_question
    from rag_dpo.pairs.builders import annotator_of
    from rag_dpo.records import read_chains
    step = read_chains(match)
    targets = tokens_by_question(step, annotator_of(step, annotator, str(match)))
    questions, ds = _questions(data, corpus, "all", None)
    questions = [q for q in questions if q.id in targets]
    if ds.corpus is None:
        from rag_dpo.errors import InputError
        raise InputError("the data file has no corpus; give --corpus", file=str(data), field="corpus")
    engine = _engine(policy, ds.corpus, retriever, rollout_set)
    sample_matched_pool(questions, engine, out, targets, seed=seed, max_chains=max_chains)
    print(f"wrote {out} ({sum(targets.values()):.0f} generated tokens matched over {len(questions)} questions)")


def _questions(data: Path, corpus: Optional[Path], split: str, limit: Optional[int]):
    from rag_dpo.data.loaders import load_dataset
    from rag_dpo.data.splits import split_questions
    ds = load_dataset(data, corpus=corpus)
    qs = ds.questions if split == "all" else split_questions(ds.questions, split)
    return (qs[:limit] if limit else qs), ds


def oracle_cmd(data: Path = typer.Option(..., "--data", help="Question file with supporting passages."),
               out: Path = typer.Option(..., "--out", help="Oracle chains JSONL."),
               corpus: Optional[Path] = typer.Option(None, "--corpus"),
               retriever: str = typer.Option("bm25", "--retriever"),
               k: int = typer.Option(3, "--k", help="Passages retrieved per search."),
               tokenizer: str = typer.Option("smollm2", "--tokenizer", help="Tokenizer for passage cuts and spans."),
               max_tokens_per_passage: int = typer.Option(64, "--max-tokens-per-passage"),
               split: str = typer.Option("train", "--split", help="train, dev, test or all."),
               limit: Optional[int] = typer.Option(None, "--limit")) -> None:
    """Gold-evidence chains for the SFT warm start; prints how often the oracle queries find their passage."""
    from rag_dpo.agent.policy import load_tokenizer
    from rag_dpo.annotate.oracle import oracle_chains, oracle_report
    from rag_dpo.records import write_chains
    from rag_dpo.retrieval import build_retriever
    questions, ds = _questions(data, corpus, split, limit)
    if ds.corpus is None:
        from rag_dpo.errors import InputError
        raise InputError("the data file has no corpus; give --corpus", file=str(data), field="corpus")
    chains = oracle_chains(questions, ds.corpus, build_retriever(retriever, ds.corpus), load_tokenizer(tokenizer),
                           k=k, max_tokens_per_passage=max_tokens_per_passage)
    write_chains(out, chains)
    print(json.dumps(oracle_report(chains, len(questions)), indent=2))
    print(f"wrote {out}")
