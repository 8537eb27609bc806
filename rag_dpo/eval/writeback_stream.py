"""The write-back stream experiment: does verified write-back let later questions use earlier answers, and do the
checks keep wrong answers out of the corpus?

On MuSiQue (whose records carry `question_decomposition`: each hop's sub-question, its answer and its supporting
paragraph) every composed question becomes a stream: its sub-questions are answered first, hop by hop (`#k` in a
sub-question is replaced by the agent's *own* answer to hop k; KB-style `X >> relation` becomes "What is the
relation of X?"), each answer is offered for write-back (`rag_dpo.retrieval.writeback`), then the composed question
is answered over the corpus as it now stands. Hops run in waves (every question's hop 1 together, then hop 2, ...)
so rollouts stay batched; a question only ever reads passages written before its current hop.

Modes, each over the same questions:
- `none`: no write-back; the composed questions over the original corpus (the flat agent);
- `checked`: write-back with the configured checks enforced;
- `unchecked`: write-back of every answer (no check enforced).
Hop-1 answers are identical in the write-back modes (greedy decoding over the untouched corpus), so they are rolled
out once (`hop1.jsonl`) and shared.

Every candidate's check scores are recorded in both write modes (`candidates.jsonl`), with its F1 against the gold
sub-answer (wrong = F1 < 0.5), and with the support score of every judge in `judges` (so one run compares the
policy judge with the lexical one and the reader). `results.json` holds, per mode, the composed questions' EM/F1, support recall
(raw, and "resolved": a retrieved written passage counts as its cited passages) and the written/wrong counts, plus
a table of written and wrong passages under each subset of checks, recomputed from the `unchecked` run's scores
(novelty there is measured against everything written so far, a slightly stricter pool than a checked run's).

Resumable: each mode writes its chains and candidates per hop and records finished hops in `progress.json`; a
rerun drops a half-finished hop's records and redoes it (the overlay file is restored to the finished hops too).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from rag_dpo.errors import InputError
from rag_dpo.io import append_jsonl, atomic_write_json, atomic_write_text, iter_jsonl
from rag_dpo.metrics import answer_scores, auroc, f1_score, support_recall
from rag_dpo.records import Chain, Question, append_chains, read_chains
from rag_dpo.retrieval.writeback import (CHECKS, MinJudge, OverlapJudge, PolicyJudge, ReaderJudge, WritebackConfig,
                                         WritebackStore, candidate_from_chain)

MODES = ("none", "checked", "unchecked")
JUDGES = ("reader+overlap", "policy+overlap", "policy", "overlap", "reader")   # a+b: both must reach the threshold
WRONG_F1 = 0.5


@dataclass
class SubQuestion:
    template: str                 # as in the file: may hold #k references and `X >> relation` form
    answer: str
    supporting_ids: list[str]


@dataclass
class StreamItem:
    question: Question            # the composed question
    subs: list[SubQuestion]


def natural_question(text: str) -> str:
    """`Hello Love >> performer` -> `What is the performer of Hello Love?`; other text unchanged."""
    if ">>" in text:
        subject, _, relation = text.partition(">>")
        return f"What is the {relation.strip()} of {subject.strip()}?"
    return text


def resolve(template: str, answers: Sequence[str | None]) -> str:
    """Replace #k by the k-th earlier answer (an unanswered hop leaves an empty string), then naturalise."""
    def sub(m):
        k = int(m.group(1)) - 1
        return (answers[k] or "") if 0 <= k < len(answers) else m.group(0)
    return " ".join(natural_question(re.sub(r"#(\d+)", sub, template)).split())


def load_stream(data_path: str | Path, limit: int | None = None):
    """(corpus, stream items) from a MuSiQue file: answerable questions that have a decomposition, in file order."""
    from rag_dpo.data import load_dataset
    from rag_dpo.data.corpus import CorpusBuilder, read_json

    path = Path(data_path)
    ds = load_dataset(path)
    if ds.corpus is None:
        raise InputError("this file has no paragraphs to search", file=str(path), field="paragraphs")
    raw = read_json(path) if path.suffix == ".json" else [obj for _, obj in iter_jsonl(path)]
    if not isinstance(raw, list):
        raise InputError("expected a list of MuSiQue records", file=str(path))
    by_content = {CorpusBuilder.key(p.title, p.text): p.id for p in ds.corpus}
    questions = {q.id: q for q in ds.questions}
    items = []
    for i, rec in enumerate(raw):
        q = questions.get(str(rec.get("id")))
        decomposition = rec.get("question_decomposition")
        if q is None or not q.answerable or not isinstance(decomposition, list) or not decomposition:
            continue
        paragraphs = rec.get("paragraphs") or []
        subs = []
        for j, d in enumerate(decomposition):
            if not isinstance(d, dict) or not isinstance(d.get("question"), str) or "answer" not in d:
                raise InputError(f"decomposition step {j} needs 'question' and 'answer'", file=str(path), record=i,
                                 field="question_decomposition")
            idx = d.get("paragraph_support_idx")
            support = []
            if isinstance(idx, int) and 0 <= idx < len(paragraphs):
                para = paragraphs[idx]
                pid = by_content.get(CorpusBuilder.key(para.get("title", "") or "", para.get("paragraph_text", "")))
                support = [pid] if pid else []
            subs.append(SubQuestion(d["question"], str(d["answer"]), support))
        items.append(StreamItem(q, subs))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InputError("no answerable question with a question_decomposition", file=str(path),
                         field="question_decomposition")
    return ds.corpus, items


# ---- per-mode bookkeeping ------------------------------------------------------------------------------------
class _ModeFiles:
    """chains.jsonl, candidates.jsonl, overlay.jsonl and progress.json of one mode; a rerun keeps finished hops."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.chains, self.candidates = folder / "chains.jsonl", folder / "candidates.jsonl"
        self.overlay, self.progress = folder / "overlay.jsonl", folder / "progress.json"
        self.done: list[str] = json.loads(self.progress.read_text())["done"] if self.progress.exists() else []
        self._drop_unfinished()

    def _drop_unfinished(self) -> None:
        keep = set(self.done)
        if self.chains.exists():
            chains = [c for c in read_chains(self.chains, tolerate_torn_tail=True) if c.meta.get("stage") in keep]
            atomic_write_text(self.chains, "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n"
                                                   for c in chains))
        for path, key in ((self.candidates, "stage"), (self.overlay, None)):
            if path.exists():
                rows = [r for _, r in iter_jsonl(path, tolerate_torn_tail=True)
                        if (r.get(key) if key else r.get("source", {}).get("stage")) in keep]
                atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def finish(self, stage: str) -> None:
        self.done.append(stage)
        atomic_write_json(self.progress, {"done": self.done})

    def read_chains(self, stage: str) -> list[Chain]:
        return [c for c in read_chains(self.chains) if c.meta.get("stage") == stage] if self.chains.exists() else []


def _rollout(engine, questions: list[Question], stage: str, mode: str) -> list[Chain]:
    chains = engine.rollout(questions)
    for c in chains:
        c.method = "agent" if mode == "none" else f"agent-writeback-{mode}"
        c.meta.update({"stage": stage, "mode": mode})
    return chains


def _sub_questions(items: list[StreamItem], hop: int, answers: dict[str, list]) -> list[tuple[StreamItem, Question]]:
    out = []
    for it in items:
        if hop < len(it.subs):
            s = it.subs[hop]
            text = resolve(s.template, answers[it.question.id])
            out.append((it, Question(id=f"{it.question.id}/hop{hop + 1}", question=text, answers=[s.answer],
                                     supporting_ids=list(s.supporting_ids), hops=1, source=it.question.source)))
    return out


def reader_render(tokenizer):
    """The reader judge's input: the agent protocol's context after one search whose observation holds only the
    cited passages, then the start of an answer step (so the policy answers from those passages alone)."""
    from rag_dpo.agent import protocol
    from rag_dpo.records import SEARCH, Step

    def render(passages, question: str) -> str:
        step = Step("0", None, protocol.format_step(f"I need to find information about {question}", SEARCH,
                                                    question), SEARCH, query=question,
                    observation=protocol.format_observation(passages, tokenizer))
        return (protocol.render_context(tokenizer, question, [step])
                + "<think>The retrieved passages contain the answer.</think>\n<answer>")
    return render


def run_mode(mode: str, items: list[StreamItem], engine, base, corpus, files: _ModeFiles,
             store: WritebackStore | None, extra_judges: dict, hop1: list[Chain] | None = None) -> None:
    """Answer the stream in one mode (see the module docstring), resuming after the hops `files` records."""
    answers: dict[str, list] = {it.question.id: [] for it in items}
    max_hops = max(len(it.subs) for it in items)
    for hop in range(max_hops if store is not None else 0):
        stage = f"hop{hop + 1}"
        rows = _sub_questions(items, hop, answers)
        if stage in files.done:
            chains = files.read_chains(stage)
        else:
            if hop == 0 and hop1 is not None:
                chains = [copy.deepcopy(c) for c in hop1]
                for c in chains:
                    c.method, c.meta["mode"] = f"agent-writeback-{mode}", mode
            else:
                engine.retriever, engine.corpus = store.retriever, store.corpus
                chains = _rollout(engine, [q for _, q in rows], stage, mode)
            _offer(store, rows, chains, stage, files, extra_judges)
            append_chains(files.chains, chains)
            files.finish(stage)
        by_id = {c.question_id: c for c in chains}
        for it, q in rows:
            answers[it.question.id].append(by_id[q.id].final_answer)
    if "composed" not in files.done:
        if store is not None:
            engine.retriever, engine.corpus = store.retriever, store.corpus
        else:
            engine.retriever, engine.corpus = base, corpus
        chains = _rollout(engine, [it.question for it in items], "composed", mode)
        append_chains(files.chains, chains)
        files.finish("composed")


def _offer(store: WritebackStore, rows, chains: list[Chain], stage: str, files: _ModeFiles,
           extra_judges: dict) -> None:
    """Offer each chain's answer for write-back; record every candidate's scores, verdict and correctness."""
    by_id = {c.question_id: c for c in chains}
    cands, meta = [], []
    for it, q in rows:
        cand = candidate_from_chain(by_id[q.id])
        if cand is None:
            continue
        cand.source.update({"stage": stage, "item": it.question.id})
        cands.append(cand)
        meta.append(q)
    for cand, cited in zip(cands, store.cite([(c.question, c.answer) for c in cands])):
        cand.cited_ids = cited
    extra = {}
    reads = []
    items = [([store.corpus[p] for p in c.cited_ids], c.question, c.answer) for c in cands]
    for name, judge in extra_judges.items():
        extra[name] = judge(items) if items else []
        if isinstance(judge, ReaderJudge):
            reads = list(judge.answers)
    verdicts = store.write(cands)
    out = []
    for i, (v, q) in enumerate(zip(verdicts, meta)):
        f1 = f1_score(v.candidate.answer, q.answers)
        out.append({"stage": stage, "question_id": q.id, "question": q.question, "answer": v.candidate.answer,
                    "gold": q.answers[0], "f1": f1, "wrong": f1 < WRONG_F1, "cited_ids": v.candidate.cited_ids,
                    "cites_gold_support": bool(set(v.candidate.cited_ids) & set(q.supporting_ids)),
                    "scores": v.scores, "passed": v.passed, "accepted": v.accepted, "passage_id": v.passage_id,
                    "judge_scores": {name: float(s[i]) for name, s in extra.items()},
                    "reader_answer": reads[i] if i < len(reads) else None})
    append_jsonl(files.candidates, out)


# ---- scoring -------------------------------------------------------------------------------------------------
def composed_scores(chains: list[Chain], written_cites: dict[str, list[str]]) -> dict:
    """EM/F1 and support recall of the composed questions; `resolved_recall` counts a retrieved written passage
    as the passages it cited (its provenance), `used_written` = share of chains that retrieved a written one."""
    rows = []
    for c in chains:
        retrieved = list(dict.fromkeys(pid for s in c.path() for pid in s.retrieved_ids))
        resolved = list(dict.fromkeys(x for pid in retrieved for x in written_cites.get(pid, [pid])))
        rows.append({**answer_scores(c.final_answer, c.gold_answers),
                     "support_recall": support_recall(retrieved, c.supporting_ids),
                     "resolved_recall": support_recall(resolved, c.supporting_ids),
                     "used_written": float(any(pid in written_cites for pid in retrieved))})
    if not rows:
        return {"n": 0}
    return {**{k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}, "n": len(rows)}


def judge_score(row: dict, judge: str) -> float:
    """A candidate's support score under `judge` (a+b: the lowest of the judges' recorded scores)."""
    return min(row["judge_scores"][j] for j in judge.split("+"))


def judge_auc(candidates: list[dict], judge: str) -> float | None:
    """P(a correct candidate scores above a wrong one) under `judge` (ties count half); None without both kinds."""
    return auroc([judge_score(r, judge) for r in candidates], [not r["wrong"] for r in candidates])


def check_table(candidates: list[dict], cfg: WritebackConfig, judges: Sequence[str]) -> list[dict]:
    """Written and wrong passages under each subset of checks (from one run's recorded scores)."""
    subsets = [(), *[(c,) for c in CHECKS], *[tuple(x for x in CHECKS if x != c) for c in CHECKS], CHECKS]
    out = []
    for judge in judges:
        for subset in subsets:
            if judge != judges[0] and subset not in (("entailment",), CHECKS):
                continue        # other judges: entailment alone and all three checks
            kept = []
            for r in candidates:
                entail = judge_score(r, judge)
                passed = {**r["passed"], "entailment": entail >= cfg.entail_threshold}
                if all(passed[c] for c in subset):
                    kept.append(r)
            name = "+".join(subset) if subset else "no checks"
            out.append({"checks": name, "judge": judge if "entailment" in subset else "-",
                        "candidates": len(candidates), "written": len(kept),
                        "wrong": sum(r["wrong"] for r in kept), "correct": sum(not r["wrong"] for r in kept)})
    return out


# ---- entry point ---------------------------------------------------------------------------------------------
@dataclass
class StreamConfig:
    """What a stream run depends on (config.json; a rerun into the same folder with other settings is refused)."""
    data: str
    policy: str
    limit: int | None
    retriever: str
    judge: str
    modes: list[str]
    writeback: dict = field(default_factory=dict)
    rollout: dict = field(default_factory=dict)


def writeback_stream(data_path: str | Path, policy: str = "smollm2", limit: int | None = 30,
                     out_dir: str | Path = "runs/writeback", retriever: str = "bm25", judge: str = "policy+overlap",
                     modes: Sequence[str] = MODES, cfg: WritebackConfig | None = None, rollout=None,
                     model_and_tokenizer=None, device: str = "auto", dtype: str = "float32",
                     use_wandb: bool = True) -> dict:
    """`rag-dpo writeback-stream`: run the stream in each mode, write results.json/.md/.png; see module doc."""
    from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine, config_dict, resolve_device, resolve_dtype
    from rag_dpo.data import check_not_trained_on
    from rag_dpo.retrieval import build_retriever

    modes = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    for m in modes:
        if m not in MODES:
            raise InputError(f"unknown mode {m!r} (choose from {', '.join(MODES)})", field="modes")
    if judge not in JUDGES:
        raise InputError(f"unknown judge {judge!r} (choose from {', '.join(JUDGES)})", field="judge")
    cfg = cfg or WritebackConfig()
    rcfg = dataclasses.replace(rollout or RolloutConfig())
    out_dir = Path(out_dir)
    scfg = StreamConfig(str(data_path), str(policy), limit, retriever, judge, modes, asdict(cfg), config_dict(rcfg))
    cfg_path = out_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        diff = [k for k, v in asdict(scfg).items() if k != "modes" and old.get(k) != v]
        if diff:
            raise InputError(f"{out_dir} holds a stream run with other settings ({', '.join(diff)} differ); use "
                             "another --out", file=str(cfg_path), field=diff[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, asdict(scfg))

    corpus, items = load_stream(data_path, limit)
    ids = [it.question.id for it in items]
    if Path(str(policy)).is_dir():
        check_not_trained_on(Path(str(policy)), ids)
    if model_and_tokenizer is None:
        from rag_dpo.agent.policy import load_policy
        dev = resolve_device(device)
        model_and_tokenizer = load_policy(str(policy), device=dev, dtype=resolve_dtype(dtype, dev))
    model, tok = model_and_tokenizer
    judges = {"policy": PolicyJudge(model, tok), "overlap": OverlapJudge(),
              "reader": ReaderJudge(model, tok, reader_render(tok))}
    enforced = MinJudge(*(judges[j] for j in judge.split("+")))
    base = build_retriever(retriever, corpus)
    engine = RolloutEngine(model, tok, base, corpus, rcfg, model_name=str(policy), retriever_name=retriever)

    hop1 = None
    write_modes = [m for m in modes if m != "none"]
    if write_modes:
        hop1_path = out_dir / "hop1.jsonl"
        rows = _sub_questions(items, 0, {it.question.id: [] for it in items})
        hop1 = read_chains(hop1_path) if hop1_path.exists() else []
        if len(hop1) != len(rows):
            engine.retriever, engine.corpus = base, corpus
            hop1 = _rollout(engine, [q for _, q in rows], "hop1", "shared")
            atomic_write_text(hop1_path, "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in hop1))

    results: dict = {"modes": {}, "config": asdict(scfg), "questions": len(items),
                     "sub_questions": sum(len(it.subs) for it in items)}
    for mode in modes:
        files = _ModeFiles(out_dir / mode)
        store = None
        if mode != "none":
            mcfg = dataclasses.replace(cfg, checks=list(cfg.checks) if mode == "checked" else [])
            store = WritebackStore(corpus, retriever, judge=enforced, cfg=mcfg, path=files.overlay,
                                   base_retriever=base)
        run_mode(mode, items, engine, base, corpus, files, store, judges, hop1)
        results["modes"][mode] = _mode_results(files, store, cfg, [judge] + [j for j in JUDGES if j != judge])
    _report(results, out_dir, use_wandb)
    return results


def _mode_results(files: _ModeFiles, store: WritebackStore | None, cfg: WritebackConfig, judges: list[str]) -> dict:
    chains = read_chains(files.chains)
    written = {w.passage.id: w.source["cited_ids"] for w in store.written} if store is not None else {}
    res = {"composed": composed_scores([c for c in chains if c.meta.get("stage") == "composed"], written)}
    if store is None:
        return res
    cands = [r for _, r in iter_jsonl(files.candidates)] if files.candidates.exists() else []
    subs = [c for c in chains if c.meta.get("stage", "").startswith("hop")]
    scores = [answer_scores(c.final_answer, c.gold_answers) for c in subs]
    res["sub_questions"] = {"n": len(subs), "em": sum(x["em"] for x in scores) / len(subs),
                            "f1": sum(x["f1"] for x in scores) / len(subs)}
    acc = [r for r in cands if r["accepted"]]
    res["written"] = {"candidates": len(cands), "written": len(acc), "wrong": sum(r["wrong"] for r in acc)}
    res["checks"] = check_table(cands, cfg, judges)
    res["judges"] = {j: {"auc": judge_auc(cands, j),
                         "mean_correct": _mean([judge_score(r, j) for r in cands if not r["wrong"]]),
                         "mean_wrong": _mean([judge_score(r, j) for r in cands if r["wrong"]])} for j in judges}
    res["sub_questions"]["attributed_cites_gold"] = _mean([float(r["cites_gold_support"]) for r in cands])
    return res


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _report(results: dict, out_dir: Path, use_wandb: bool) -> None:
    atomic_write_json(out_dir / "results.json", results)
    md = ["| mode | EM | F1 | support recall | resolved recall | used written | sub-q EM | written | wrong written |",
          "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results["modes"].items():
        c, w, s = r["composed"], r.get("written", {}), r.get("sub_questions", {})
        md.append(f"| {mode} | {c.get('em', 0):.3f} | {c.get('f1', 0):.3f} | {c.get('support_recall', 0):.3f} | "
                  f"{c.get('resolved_recall', 0):.3f} | {c.get('used_written', 0):.3f} | "
                  f"{format(s['em'], '.3f') if s else '-'} | {w.get('written', '-')} | {w.get('wrong', '-')} |")
    for mode, r in results["modes"].items():
        if "checks" in r:
            md += ["", f"Checks ({mode} run's scores): written and wrong (answer F1 < {WRONG_F1}) passages", "",
                   "| checks | judge | candidates | written | wrong | correct |", "|---|---|---|---|---|---|"]
            md += [f"| {t['checks']} | {t['judge']} | {t['candidates']} | {t['written']} | {t['wrong']} | "
                   f"{t['correct']} |" for t in r["checks"]]
            md += ["", "| judge | AUC (correct above wrong) | mean score, correct | mean score, wrong |",
                   "|---|---|---|---|"]
            md += [f"| {j} | {_fmt(v['auc'])} | {_fmt(v['mean_correct'])} | {_fmt(v['mean_wrong'])} |"
                   for j, v in r["judges"].items()]
    table = "\n".join(md) + "\n"
    (out_dir / "results.md").write_text(table, encoding="utf-8")
    plot = _plot(results, out_dir / "results.png")
    if use_wandb:
        from rag_dpo import tracking
        run = tracking.init_run("writeback-stream", config=results["config"], job_type="eval", dir=out_dir)
        for mode, r in results["modes"].items():
            tracking.log(run, {f"{mode}/{k}": v for k, v in r["composed"].items()})
        tracking.log_image(run, "results_plot", plot)
        tracking.finish(run)


def _plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    metrics = ("em", "f1", "support_recall", "resolved_recall")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(1, len(modes))
    for i, m in enumerate(modes):
        ax.bar([j + i * width for j in range(len(metrics))],
               [results["modes"][m]["composed"].get(k, 0.0) for k in metrics], width, label=m)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(metrics))], metrics, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"composed questions (n={results['questions']})", fontsize=9)
    ax.legend(fontsize=8)
    src = next((r for m, r in results["modes"].items() if m == "unchecked" and "checks" in r),
               next((r for r in results["modes"].values() if "checks" in r), None))
    if src is not None:
        rows = src["checks"]
        labels = [f"{t['checks']}\n({t['judge']})" if t["judge"] != "-" else t["checks"] for t in rows]
        bx.barh(range(len(rows)), [t["correct"] for t in rows], label="correct", color="tab:green")
        bx.barh(range(len(rows)), [t["wrong"] for t in rows], left=[t["correct"] for t in rows], label="wrong",
                color="tab:red")
        bx.set_yticks(range(len(rows)), labels, fontsize=6)
        bx.invert_yaxis()
        bx.set_xlabel("passages written")
        bx.legend(fontsize=8)
        bx.set_title("written passages by checks enforced", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
