"""`rag-dpo train recipes/retriever.yaml` (`method: retriever`): generator feedback trains the retriever, end to end.

Steps, each skipped when its output exists (kill and rerun resumes; the scores file and the agent evals resume
inside a step too):
    warm_start/            the policy: LoRA SFT on oracle chains (pipeline.run.warm_start). The base SmolLM2 does
                           not follow the agent protocol (parse errors on every chain), so neither its search steps
                           nor its agent EM would mean anything; a small warm start is the cheapest policy that does.
    pool/chains.jsonl      greedy rollouts of that policy on train questions: the search steps become queries
                           (or `trainer.pool` names an existing chains file, e.g. a recipe's rollouts/labels.jsonl)
    retrievers/untuned/    the bundled MiniLM saved with the trained ones' max_seq_length (the fair baseline)
    scores/scores.jsonl    usefulness of each candidate for each query (+ scores.cost.json: passages scored per s)
    retrievers/<variant>/  dense | rerank | e2e, sentence-transformers folders + training_manifest.json
    retrieval.json         recall@1/3/5 on the eval split and on the transfer file, per retriever
    eval/<retriever>/      the agent (rag_dpo.eval.evaluate) with each retriever on the eval split
    results.md/.json/.png  the tables, the plot, and passages whose rank changed (trained vs untuned dense)

Retrievers are named as every stage names them (`bm25`, `dense:PATH`, `hybrid:PATH`, `rerank:PATH`), so the eval
calls the ordinary `evaluate` with a different `retriever`, and each trained retriever's manifest is checked
against the eval questions. The trained bi-encoders tune the query side only and share the untuned model's corpus
embeddings (`retrieval.trained.share_document_index`, checked on a sample), so no corpus is re-encoded.
"""

from __future__ import annotations

import time
from pathlib import Path

from rag_dpo.errors import InputError
from rag_dpo.io import atomic_write_json, atomic_write_text
from rag_dpo.pipeline.recipe import Recipe, resolved_dict, trainer_settings
from rag_dpo.pipeline.run import log, release_memory, resolve_path

KS = (1, 3, 5)
LABELS = {"bm25": "BM25", "dense": "dense (untuned)", "hybrid": "hybrid (untuned)", "dense-trained":
          "dense (usefulness-trained)", "hybrid-trained": "hybrid (BM25 + usefulness-trained dense)",
          "rerank": "reranker (BM25 top-m)", "e2e": "dense (end-to-end soft top-k)"}


# The paired comparisons the report tests (recall@5 per question, paired bootstrap): each trained retriever against
# what it started from, and the trained dense against the target's other bar, the untuned hybrid.
PAIRED = (("dense-trained", "dense"), ("hybrid-trained", "hybrid"), ("dense-trained", "hybrid"), ("e2e", "dense"),
          ("rerank", "bm25"))


def retriever_specs(run_dir: Path, variants: list[str]) -> dict[str, str]:
    """Short name -> retriever spec for every retriever the run compares."""
    r = run_dir / "retrievers"
    specs = {"bm25": "bm25", "dense": f"dense:{r / 'untuned'}", "hybrid": f"hybrid:{r / 'untuned'}"}
    if "dense" in variants:
        specs["dense-trained"] = f"dense:{r / 'dense'}"
        specs["hybrid-trained"] = f"hybrid:{r / 'dense'}"
    if "rerank" in variants:
        specs["rerank"] = f"rerank:{r / 'rerank'}"
    if "e2e" in variants:
        specs["e2e"] = f"dense:{r / 'e2e'}"
    return specs


def _collect_pool(recipe: Recipe, run_dir: Path, policy: str, model_and_tok) -> list:
    from rag_dpo.agent.rollout import RolloutEngine
    from rag_dpo.pipeline.run import eval_rollout_config, pool_questions, world
    from rag_dpo.records import read_chains
    cfg = trainer_settings(recipe)
    if cfg.pool:
        return read_chains(resolve_path(cfg.pool))
    path = run_dir / "pool" / "chains.jsonl"
    w = world(recipe)
    qs = pool_questions(recipe)
    rcfg = eval_rollout_config(recipe, batch_size=recipe.rollout.batch_size)
    model, tok = model_and_tok
    engine = RolloutEngine(model, tok, w.retriever, w.corpus, rcfg, model_name=str(policy),
                           retriever_name=recipe.retrieval.name)
    log(f"pool: greedy rollouts of {len(qs)} train questions")
    engine.rollout_to_file(qs, path)
    return read_chains(path)


def recall_at(retriever, questions, ks=KS) -> dict:
    """Supporting-passage recall@k for each k from one batched search (k = max(ks)), and the ranked ids."""
    from rag_dpo.metrics import support_recall
    scored = [q for q in questions if q.supporting_ids]
    t0 = time.perf_counter()
    hits = retriever.search([q.question for q in scored], max(ks))
    seconds = time.perf_counter() - t0
    ranked = {q.id: [pid for pid, _ in h] for q, h in zip(scored, hits)}
    out = {f"recall@{k}": sum(support_recall(ranked[q.id], q.supporting_ids, k) for q in scored) / len(scored)
           for k in ks}
    out.update({"questions": len(scored), "queries_per_s": len(scored) / seconds if seconds else 0.0})
    return {"metrics": out, "ranked": ranked}


def _contains_answer(text: str, answers: list[str]) -> bool:
    from rag_dpo.metrics import cover_exact_match
    return any(cover_exact_match(text, [a]) for a in answers if a)


def rank_changes(questions, corpus, before: dict, after: dict, depth: int = 10, n: int = 6) -> dict:
    """Passages whose rank moved most between two rankings (top `depth` of either), with whether they hold the
    answer; and the mean rank gain of answer-holding vs other passages (rank depth+1 = not in the top depth)."""
    rows = []
    for q in questions:
        b, a = before.get(q.id, [])[:depth], after.get(q.id, [])[:depth]
        for pid in dict.fromkeys(b + a):
            rb = b.index(pid) + 1 if pid in b else depth + 1
            ra = a.index(pid) + 1 if pid in a else depth + 1
            p = corpus[pid]
            rows.append({"question_id": q.id, "question": q.question, "answer": q.answers[0] if q.answers else "",
                         "passage": pid, "title": p.title, "text": p.text[:160],
                         "holds_answer": _contains_answer(f"{p.title} {p.text}", q.answers),
                         "supporting": pid in q.supporting_ids, "before": rb, "after": ra, "gain": rb - ra})

    def mean_gain(sel):
        return sum(r["gain"] for r in sel) / len(sel) if sel else 0.0
    holds = [r for r in rows if r["holds_answer"]]
    rest = [r for r in rows if not r["holds_answer"]]
    top = sorted(rows, key=lambda r: -abs(r["gain"]))[:n]
    return {"mean_gain_holds_answer": mean_gain(holds), "mean_gain_other": mean_gain(rest),
            "n_holds_answer": len(holds), "n_other": len(rest), "examples": top}


def _retrieval_eval(specs: dict[str, str], datasets: dict[str, tuple], run_dir: Path, cfg,
                    fit: tuple | None = None) -> dict:
    """Recall of every retriever on every (questions, corpus) of `datasets` (eval questions: each trained
    retriever's manifest is checked), and, when `fit` = (train questions, corpus) is given, on the questions the
    retrievers were trained on: a fit check, not a result (see `fit_markdown`)."""
    from rag_dpo.data import check_not_trained_on
    from rag_dpo.retrieval import build_retriever, retriever_manifest
    from rag_dpo.retrieval.trained import share_document_index
    path = run_dir / "retrieval.json"
    if path.exists():
        import json
        return json.loads(path.read_text())
    from rag_dpo.eval.stats import paired_bootstrap
    from rag_dpo.metrics import support_recall
    out: dict = {"metrics": {}, "rank_changes": {}}
    per_question: dict[str, dict[str, list[float]]] = {}     # data set -> retriever -> recall@5 per question
    untuned = run_dir / "retrievers" / "untuned"
    for dname, (questions, corpus) in datasets.items():
        ranked = {}
        for name, spec in specs.items():
            check_not_trained_on(retriever_manifest(spec), [q.id for q in questions])
            if spec.startswith("dense:") and name != "dense":
                shared = share_document_index(spec.split(":", 1)[1], untuned, corpus)
                log(f"retrieval eval: {name} on {dname}" + (" (corpus embeddings shared with untuned)" if shared
                                                            else " (encoding the corpus)"))
            else:
                log(f"retrieval eval: {name} on {dname}")
            opts = {"depth": cfg.rerank_depth} if spec.startswith("rerank:") else {}
            r = recall_at(build_retriever(spec, corpus, **opts), questions)
            out["metrics"].setdefault(dname, {})[name] = r["metrics"]
            ranked[name] = r["ranked"]
        for variant in ("dense-trained", "e2e"):
            if variant in ranked:
                out["rank_changes"].setdefault(dname, {})[variant] = rank_changes(
                    questions, corpus, ranked["dense"], ranked[variant])
        scored = [q for q in questions if q.supporting_ids]
        per_question[dname] = {name: [support_recall(rk[q.id], q.supporting_ids, 5) for q in scored]
                               for name, rk in ranked.items()}
    held_out = [d for d in per_question if "(transfer" not in d]
    if len(held_out) > 1:       # every held-out split of the data file, pooled: twice the questions
        per_question["held-out splits pooled"] = {name: sum((per_question[d][name] for d in held_out), [])
                                                  for name in per_question[held_out[0]]}
    out["paired"] = {dname: {f"{a} - {b}": paired_bootstrap(rows[a], rows[b], n_boot=10000)
                             for a, b in PAIRED if a in rows and b in rows}
                     for dname, rows in per_question.items()}
    if fit is not None:
        questions, corpus = fit
        for name, spec in specs.items():     # the training questions on purpose: no manifest check
            log(f"fit check: {name} on its {len(questions)} training questions")
            opts = {"depth": cfg.rerank_depth} if spec.startswith("rerank:") else {}
            out.setdefault("fit", {})[name] = recall_at(build_retriever(spec, corpus, **opts), questions)["metrics"]
    atomic_write_json(path, out)
    return out


def _agent_eval(recipe: Recipe, run_dir: Path, specs: dict[str, str], policy: str, model_and_tok) -> dict:
    from rag_dpo.eval.evaluate import evaluate
    from rag_dpo.pipeline.run import eval_rollout_config, world
    from rag_dpo.retrieval import retriever_manifest
    w = world(recipe)
    results = {}
    for name, spec in specs.items():
        log(f"agent eval: {name} ({spec}) on {recipe.eval.limit or 'all'} {recipe.data.eval_split} questions")
        res = evaluate(w.data_path, recipe.data.corpus, policy=str(policy), methods=["agent"],
                       split=recipe.data.eval_split, limit=recipe.eval.limit, out_dir=run_dir / "eval" / name,
                       retriever=spec, k=recipe.retrieval.k, seed=recipe.seed,
                       manifest=retriever_manifest(spec), rollout=eval_rollout_config(recipe),
                       model_and_tokenizer=model_and_tok, use_wandb=False, fractions=recipe.data.fractions)
        results[name] = res["agent"]
        release_memory()
    return results


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def results_markdown(recipe: Recipe, retrieval: dict, agent: dict, cost: dict, training: dict) -> str:
    lines = [f"# Generator-feedback retrievers ({recipe.name})", ""]
    lines += [f"Usefulness scoring: {cost.get('queries', 0)} queries, {cost.get('passages_scored', 0)} candidate "
              f"passages scored in {cost.get('seconds', 0):.0f} s = **{cost.get('passages_per_s', 0):.2f} passages/s** "
              f"({cost.get('rows_per_s', 0):.2f} forward rows/s incl. the no-passage row, "
              f"{cost.get('tokens_per_s', 0):.0f} tokens/s, batch {cost.get('batch_size')}).", ""]
    if training:
        lines += ["| retriever | training rows | steps | seconds |", "|---|---:|---:|---:|"]
        lines += [f"| {v} | {t.get('rows')} | {t.get('steps')} | {t.get('seconds')} |" for v, t in training.items()]
        lines.append("")
    for dname, table in retrieval["metrics"].items():
        lines += [f"## Supporting-passage recall, {dname}", "",
                  "| retriever | recall@1 | recall@3 | recall@5 | questions |", "|---|---:|---:|---:|---:|"]
        for name, m in table.items():
            lines.append(f"| {LABELS.get(name, name)} | {_fmt(m['recall@1'])} | {_fmt(m['recall@3'])} | "
                         f"{_fmt(m['recall@5'])} | {m['questions']} |")
        lines.append("")
    if retrieval.get("paired"):
        lines += ["## Paired differences in recall@5 (per question; 95 % paired bootstrap interval, p-value)", "",
                  "| comparison | " + " | ".join(retrieval["paired"]) + " |",
                  "|---|" + "---|" * len(retrieval["paired"])]
        for pair in dict.fromkeys(p for table in retrieval["paired"].values() for p in table):
            cells = []
            for table in retrieval["paired"].values():
                r = table.get(pair)
                p = "p < 0.01" if r and r["p_value"] < 0.01 else f"p {r['p_value']:.2f}" if r else ""
                cells.append(f"{100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] {p}" if r else "")
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
        lines += ["", "Points of recall@5. A gain is shown only where the interval excludes 0.", ""]
    if agent:
        lines += [f"## The agent with each retriever ({recipe.data.eval_split} split, {recipe.eval.limit} questions, "
                  "greedy)", "", "| retriever | EM | F1 | support recall | parse errors | steps |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, m in agent.items():
            lines.append(f"| {LABELS.get(name, name)} | {_fmt(m['em'])} | {_fmt(m['f1'])} | "
                         f"{_fmt(m['support_recall'])} | {_fmt(m['parse_error_rate'])} | {m['steps']:.2f} |")
        lines.append("")
    lines += targets_markdown(retrieval, agent)
    lines += fit_markdown(retrieval)
    for dname, per in retrieval.get("rank_changes", {}).items():
        for variant, rc in per.items():
            lines += [f"## Rank changes, {LABELS.get(variant, variant)} vs untuned dense ({dname}, top 10)", "",
                      f"Mean rank gain of passages holding the answer: {rc['mean_gain_holds_answer']:+.2f} "
                      f"({rc['n_holds_answer']} passages); of the others: {rc['mean_gain_other']:+.2f} "
                      f"({rc['n_other']}). Rank 11 = outside the top 10.", "",
                      "| question | answer | passage | holds answer | supporting | rank before → after |",
                      "|---|---|---|---|---|---|"]
            for e in rc["examples"]:
                lines.append(f"| {e['question']} | {e['answer']} | {e['title']}: {e['text'][:80]}… | "
                             f"{'yes' if e['holds_answer'] else 'no'} | {'yes' if e['supporting'] else 'no'} | "
                             f"{e['before']} → {e['after']} |")
            lines.append("")
    return "\n".join(lines)


def fit_markdown(retrieval: dict) -> list[str]:
    """Recall on the train questions the retrievers were trained on. Not a result (they saw these questions), but
    the check that tells a broken objective or implementation from poor generalisation: a trained retriever that
    ranks its own training questions' supporting passages worse than the untuned one did has not learnt to
    retrieve them (the first run's usefulness-trained dense: recall@5 0.703 -> 0.521 on its 96 questions)."""
    fit = retrieval.get("fit")
    if not fit:
        return []
    n = next(iter(fit.values()))["questions"]
    out = [f"## Fit check: recall on the {n} train questions the retrievers were trained on (not a result)", "",
           "| retriever | recall@1 | recall@3 | recall@5 |", "|---|---:|---:|---:|"]
    out += [f"| {LABELS.get(k, k)} | {_fmt(m['recall@1'])} | {_fmt(m['recall@3'])} | {_fmt(m['recall@5'])} |"
            for k, m in fit.items()]
    return out + [""]


def targets_markdown(retrieval: dict, agent: dict) -> list[str]:
    """Issue 15's targets, stated with the margin by which each is met or missed."""
    out = ["## Targets", ""]
    for i, (dname, table) in enumerate(retrieval["metrics"].items()):
        if "dense-trained" not in table or "(transfer" in dname:
            continue
        t, d, h = (table[n]["recall@5"] for n in ("dense-trained", "dense", "hybrid"))
        where = "" if i == 0 else f" ({dname}, not the target's split)"
        out.append(f"- trained dense recall@5 {t:.3f} vs untuned dense + 3 points {d + 0.03:.3f}: "
                   f"{'met' if t >= d + 0.03 else 'missed'} by {100 * abs(t - d - 0.03):.1f} points{where}")
        out.append(f"- trained dense recall@5 {t:.3f} vs hybrid {h:.3f}: {'met' if t >= h else 'missed'} by "
                   f"{100 * abs(t - h):.1f} points{where}")
    if agent and "dense-trained" in agent and "bm25" in agent:
        t, b = agent["dense-trained"]["support_recall"], agent["bm25"]["support_recall"]
        out.append(f"- agent support recall with trained dense {t:.3f} vs with BM25 {b:.3f}: "
                   f"{'met' if t >= b else 'missed'} by {100 * abs(t - b):.1f} points")
    out.append("")
    return out


def plot_results(retrieval: dict, agent: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = len(retrieval["metrics"]) + (1 if agent else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    for ax, (dname, table) in zip(axes[0], retrieval["metrics"].items()):
        names = list(table)
        width = 0.8 / len(KS)
        for j, k in enumerate(KS):
            ax.bar([i + j * width for i in range(len(names))], [table[n][f"recall@{k}"] for n in names], width,
                   label=f"recall@{k}")
        ax.set_xticks([i + width for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"supporting-passage recall\n{dname}", fontsize=9)
        ax.legend(fontsize=8)
    if agent:
        ax = axes[0][-1]
        names = list(agent)
        keys = ("em", "f1", "support_recall")
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            ax.bar([i + j * width for i in range(len(names))], [agent[n][key] for n in names], width, label=key)
        ax.set_xticks([i + width for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title("agent with each retriever")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_retriever_recipe(recipe: Recipe, run_dir: str | Path, restart: bool = False) -> dict:
    """Warm start -> pool -> usefulness scores -> train dense/rerank/e2e -> recall and agent eval -> report."""
    import json

    from rag_dpo import tracking
    from rag_dpo.agent.policy import load_policy
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.pipeline.run import prepare_run_dir, warm_start, world
    from rag_dpo.retrieval import build_retriever
    from rag_dpo.train.retriever import (DONE, candidate_lists, check_train_split, prior_similarities,
                                         question_queries, read_scores, save_untuned, score_queries, step_queries,
                                         train_retriever)

    t0 = time.perf_counter()
    cfg = trainer_settings(recipe)
    run_dir = prepare_run_dir(recipe, run_dir, restart)
    run = tracking.init_run(run_dir.name, resolved_dict(recipe), group=recipe.group or recipe.name,
                            job_type="retriever", dir=run_dir)
    try:
        w = world(recipe)
        log(f"data: {len(w.train)} train / {len(w.eval)} {recipe.data.eval_split} questions")
        policy = warm_start(recipe, run_dir) or recipe.model
        model_and_tok = load_policy(str(policy), merge_adapter=True)
        pool = _collect_pool(recipe, run_dir, str(policy), model_and_tok)

        # queries: train questions + the pool's search steps (train questions only, by construction and checked)
        train_qs = w.train if cfg.questions is None else w.train[:cfg.questions]
        by_id = {q.id: q for q in w.train}
        queries = question_queries(train_qs)
        if cfg.step_queries:
            queries += step_queries([c for c in pool if c.question_id in by_id], by_id)
        check_train_split({q.question_id for q in queries}, recipe.data.fractions, recipe.data.train_split)
        log(f"queries: {sum(q.source == 'question' for q in queries)} questions + "
            f"{sum(q.source == 'step' for q in queries)} search steps of the pool")

        untuned = save_untuned(run_dir / "retrievers" / "untuned", cfg.max_seq_length)
        scores_path = run_dir / "scores" / "scores.jsonl"
        if not (run_dir / "scores" / "done.json").exists():
            sources = [build_retriever("bm25s", w.corpus), build_retriever(f"dense:{untuned}", w.corpus)]
            cands = candidate_lists([q.query for q in queries], sources, cfg.candidates)
            model, tok = model_and_tok
            score_queries(queries, cands, w.corpus, model, tok, scores_path, passage_tokens=cfg.passage_tokens,
                          batch_size=cfg.score_batch_size)
            atomic_write_json(run_dir / "scores" / "done.json", {"queries": len(queries)})
        records = read_scores(scores_path)
        untuned_index = build_retriever(f"dense:{untuned}", w.corpus)    # the prior of the posterior target
        if cfg.prior_weight:
            prior = prior_similarities(records, w.corpus, retriever=untuned_index)
            records = [{**r, "prior": p} for r, p in zip(records, prior)]
        cost = json.loads(scores_path.with_suffix(".cost.json").read_text())
        log(f"usefulness: {cost['passages_scored']} passages scored, {cost['passages_per_s']:.2f}/s")
        tracking.log(run, {f"scoring/{k}": v for k, v in cost.items() if isinstance(v, (int, float))})

        training = {}
        for variant in cfg.variants:
            out = run_dir / "retrievers" / variant
            if not (out / DONE).exists():
                log(f"train: {variant} on {len(records)} scored queries")
                release_memory()
            train_retriever(variant, records, w.corpus, cfg, out, fractions=recipe.data.fractions,
                            data_files=[w.data_path], first_stage=build_retriever("bm25s", w.corpus),
                            prior_retriever=untuned_index)
            training[variant] = json.loads((out / DONE).read_text())
            log_history = json.loads((out / "train_log.json").read_text())
            for e in log_history:
                if "loss" in e:
                    tracking.log(run, {f"train/{variant}/loss": e["loss"], f"train/{variant}/epoch": e.get("epoch")})

        specs = retriever_specs(run_dir, cfg.variants)
        datasets = {f"{w.data_path.name} ({recipe.data.eval_split})": (w.eval, w.corpus)}
        for split in ("dev", "test"):    # the other held-out split too: one test passage is ~0.8 points of recall
            if split not in (recipe.data.train_split, recipe.data.eval_split):
                held = split_questions(load_dataset(w.data_path, format=recipe.data.format, corpus=w.corpus).questions, split,
                                       recipe.data.fractions)
                if held:
                    datasets[f"{w.data_path.name} ({split}, held out too)"] = (held, w.corpus)
        if cfg.transfer:
            tds = load_dataset(resolve_path(cfg.transfer), corpus=resolve_path(cfg.transfer_corpus)
                               if cfg.transfer_corpus else None)
            if tds.corpus is None:
                raise InputError("the transfer file has no corpus; set trainer.transfer_corpus", file=cfg.transfer,
                                 field="trainer.transfer_corpus")
            datasets[f"{Path(cfg.transfer).name} (transfer, all)"] = (tds.questions, tds.corpus)
        fit_ids = dict.fromkeys(r["question_id"] for r in records if r.get("source") == "question")
        retrieval = _retrieval_eval(specs, datasets, run_dir, cfg, fit=([by_id[q] for q in fit_ids if q in by_id],
                                                                       w.corpus))

        agent = {}
        if cfg.agent_eval:
            agent = _agent_eval(recipe, run_dir, specs, str(policy), model_and_tok)
        md = results_markdown(recipe, retrieval, agent, cost, training)
        plot = plot_results(retrieval, agent, run_dir / "results.png")
        results = {"retrieval": retrieval["metrics"], "fit": retrieval.get("fit", {}), "agent": agent,
                   "scoring_cost": cost, "training": training,
                   "specs": specs, "policy": str(policy), "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_json(run_dir / "results.json", results)
        atomic_write_text(run_dir / "results.md", md + "\n")
        for dname, table in retrieval.get("paired", {}).items():
            tracking.log(run, {f"paired_recall@5/{dname}/{pair}": r["diff"] for pair, r in table.items()})
        for dname, table in retrieval["metrics"].items():
            tracking.log_table(run, f"recall/{dname}", ["retriever", *[f"recall@{k}" for k in KS]],
                               [[n, *[m[f"recall@{k}"] for k in KS]] for n, m in table.items()])
        if agent:
            tracking.log_table(run, "agent", ["retriever", "em", "f1", "support_recall"],
                               [[n, m["em"], m["f1"], m["support_recall"]] for n, m in agent.items()])
        tracking.log_image(run, "results_plot", plot)
        log(f"done in {time.perf_counter() - t0:.0f} s: {run_dir / 'results.md'}")
        print(md)
        return results
    finally:
        tracking.finish(run)
