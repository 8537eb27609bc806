"""The eval stage: run a policy with every method (baselines and the agent) on one split and score it.

`evaluate(...)` writes into `out_dir`:
- `chains.jsonl`: every chain (`method` set), appended per batch, so a killed eval resumes where it stopped;
- `results.json`: method -> {em, f1, cover_em, support_recall, answer_seen, em_when_seen, steps, parse_error_rate, n,
  seconds};
- `results.md` (the same as a table, with deltas against `baseline_results` when given), `results.png`;
- `config.json`: the settings that produced them, with a fingerprint of the prompts and of the policy folder's
  weights (a rerun with other settings, prompts or weights into the same folder is refused, so results never mix
  two configurations);
and logs the metrics, the plot and a table of chains (with their steps) to wandb (offline by default).

Metrics are computed on each chain's selected path: answer metrics on its final answer (none = 0), support recall
over the union of passages retrieved on the path, `steps` = path length, `parse_error_rate` = fraction of chains
with a step that did not parse (baselines: a reply without the <answer> tag; its plain text still counts as the
answer), `answer_seen` = share of the questions with a non-yes/no gold answer whose answer appears in the passages
the path read (as cut to the passage token budget), `em_when_seen` = EM on those that saw it. Eval refuses questions the policy was trained on (its folder's `training_manifest.json`), and
those a trained retriever (`dense:PATH`, `rerank:PATH`, `hybrid:PATH`) was trained on (that folder's manifest).

Under a multi-process launch (`torchrun`, `accelerate launch`) the questions go round the ranks in whole batches
(`rag_dpo.distributed.run_sharded`, the stage's batch size): every batch holds the questions a single process would
batch, rank 0 alone appends the gathered chains in question order and writes the results files and the wandb run,
so `chains.jsonl` equals a one-process eval's (apart from each chain's timing in `meta.seconds`). Every rank
returns the results.

`agent-prm-bon`: at each step the agent samples N candidate next steps, a PRM (`annotate.prm.PRMScorer`) scores
them and the best is kept; all candidates stay in the chain tree with their score in `labels["prm"]`.
`agent-self-bon` / `agent-random-bon`: the same best-of-N, choosing by the policy's own self-score
(`train.self_eval.SelfScorer`, `labels["self"]`) / at random (`labels["random"]`: the control for both).
`agent-hier`: the planner / synthesizer agent (`agent.hierarchical`; its answer budget is `answer_tokens`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine, config_dict, resolve_device, resolve_dtype
from rag_dpo.errors import InputError
from rag_dpo.io import atomic_write_json, stable_hash
from rag_dpo.metrics import answer_scores, answer_seen, support_recall
from rag_dpo.records import Chain, Label, Question, append_chains, read_chains

METHODS = ("direct", "rag", "iter-retgen", "agent", "agent-hier", "agent-prm-bon",
           "agent-self-bon", "agent-random-bon")   # best-of-N by self-score / random pick (train/self_eval.py)
DEFAULT_METHODS = ("direct", "rag", "iter-retgen", "agent")
METRICS = ("em", "f1", "cover_em", "support_recall", "answer_seen", "em_when_seen", "steps", "parse_error_rate", "n",
           "seconds")


@dataclass
class EvalConfig:
    """What an eval run depends on (saved as config.json; the resume check compares it)."""
    data: str
    corpus: str | None = None
    policy: str = "smollm2"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    split: str = "dev"
    limit: int | None = None
    retriever: str = "bm25"
    iter_rounds: int = 2            # ITER-RETGEN rounds
    answer_tokens: int = 32         # baselines: generation budget of an answer (the agent's steps use the rollout's)
    shots: int = 0                  # baselines: worked examples before the question (for a model never trained on
                                    # the answer format; agent.baselines.DEMONSTRATIONS)
    bon_n: int = 4                  # agent-prm-bon: candidates per step
    prm: str | None = None          # agent-prm-bon: saved PRM folder
    dtype: str = "float32"          # policy weights (auto = bf16 where the hardware has fast bf16: faster, but
                                    # bf16 rounding erases most of a short fine-tune's change; see bf16_erased_change)
    rollout: dict = field(default_factory=dict)   # RolloutConfig fields


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    for m in names:
        if m not in METHODS:
            raise InputError(f"unknown method {m!r} (choose from {', '.join(METHODS)})", field="methods")
    if not names:
        raise InputError("no method given", field="methods")
    return list(dict.fromkeys(names))


def chain_scores(chain: Chain) -> dict[str, float]:
    """Per-chain metrics on the selected path (compare and reports recompute per question with this)."""
    path = chain.path()
    retrieved = list(dict.fromkeys(pid for s in path for pid in s.retrieved_ids))
    scores = answer_scores(chain.final_answer, chain.gold_answers)
    scores["support_recall"] = support_recall(retrieved, chain.supporting_ids)
    scores["steps"] = float(len(path))
    scores["parse_error"] = float(any(s.parse_error for s in path))
    scores["answer_seen"] = answer_seen([s.observation for s in path], chain.gold_answers)   # None: yes/no gold
    return scores


def summarize(chains: Sequence[Chain]) -> dict[str, float]:
    """Means over the chains; `answer_seen` over the questions whose gold answer a passage can state (not yes/no)
    and `em_when_seen` (the reader's EM once the answer was in front of it) over those where it was seen."""
    n = len(chains)
    per = [chain_scores(c) for c in chains]
    mean = (lambda key: sum(p[key] for p in per) / n if n else 0.0)
    stated = [p for p in per if p["answer_seen"] is not None]
    seen = [p for p in stated if p["answer_seen"]]
    return {"em": mean("em"), "f1": mean("f1"), "cover_em": mean("cover_em"),
            "support_recall": mean("support_recall"),
            "answer_seen": len(seen) / len(stated) if stated else 0.0,
            "em_when_seen": sum(p["em"] for p in seen) / len(seen) if seen else 0.0,
            "steps": mean("steps"), "parse_error_rate": mean("parse_error"), "n": n,
            "seconds": sum(float(c.meta.get("seconds", 0.0)) for c in chains)}


def prm_best_of_n(engine: RolloutEngine, questions: Sequence[Question], scorer, n: int = 4,
                  method: str = "agent-prm-bon", label: str = "prm") -> list[Chain]:
    """Agent with PRM-guided best-of-N next steps (batched sampling across questions; the scorer is called per
    question with `score(question, prefix_steps, candidates) -> list[float]`; scores go to `labels[label]`)."""
    t0 = time.perf_counter()
    chains = []
    for q in questions:
        c = engine.new_chain(q)
        c.method = method
        c.meta["bon_n"] = n
        chains.append(c)
    leaf: dict[int, str | None] = {id(c): None for c in chains}
    active = list(chains)
    for _ in range(engine.cfg.max_steps):
        if not active:
            break
        candidates = engine.sample_next_steps([(c, leaf[id(c)]) for c in active], n)
        for c, cands in zip(active, candidates):
            prefix = c.path(leaf[id(c)]) if leaf[id(c)] is not None else []
            scores = [float(x) for x in scorer.score(c.question, prefix, cands)]
            for s, v in zip(cands, scores):
                s.labels[label] = Label(v, v >= 0.5, label)
                c.add_step(s)
            leaf[id(c)] = cands[max(range(len(cands)), key=lambda i: scores[i])].id
        active = [c for c in active if not engine.is_terminal(c.step(leaf[id(c)]))]
    per = (time.perf_counter() - t0) / max(1, len(chains))
    for c in chains:
        c.selected = leaf[id(c)]
        c.meta["seconds"] = per
    return chains


def _agent(engine: RolloutEngine, questions: Sequence[Question]) -> list[Chain]:
    t0 = time.perf_counter()
    chains = engine.rollout(questions)
    per = (time.perf_counter() - t0) / max(1, len(chains))
    for c in chains:
        c.meta["seconds"] = per
    return chains


def _load_prm(prm):
    if prm is None:
        raise InputError("agent-prm-bon needs a PRM: pass --prm FOLDER", field="prm")
    if hasattr(prm, "score"):
        return prm
    from rag_dpo.annotate.prm import PRMScorer   # a later stage's file, imported only for this method
    return PRMScorer.load(prm)


def _policy_manifest(policy: str) -> Path | None:
    p = Path(policy)
    return p if p.is_dir() else None


def prompts_fingerprint() -> str:
    """Hash of every prompt text an eval's chains depend on (system, baseline, synthesizer)."""
    import hashlib

    from rag_dpo.agent import baselines, hierarchical, protocol
    prompts = hashlib.blake2b(digest_size=8)
    for text in (protocol.SYSTEM_PROMPT, baselines.BASELINE_PROMPT, hierarchical.SYNTHESIZER_PROMPT):
        prompts.update(text.encode() + b"\0")
    return prompts.hexdigest()


def fingerprint(policy: str) -> dict:
    """What the settings do not show but the chains depend on: the prompts' text and, for a policy folder, its
    weights' bytes (retraining into the same folder, or editing a prompt, must not resume the old chains)."""
    import hashlib
    weights = None
    folder = _policy_manifest(policy)
    if folder is not None:
        h = hashlib.blake2b(digest_size=8)
        for f in sorted(folder.glob("*.safetensors")):
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        weights = h.hexdigest()
    return {"prompts": prompts_fingerprint(), "weights": weights}


LATER_KEYS = {"shots": 0}   # settings added after eval folders were written: a folder without one had the default


def _check_config(out_dir: Path, cfg: dict) -> None:
    path = out_dir / "config.json"
    if path.exists() and (out_dir / "chains.jsonl").exists():
        import json
        old = json.loads(path.read_text())
        keys = ("data", "corpus", "policy", "split", "limit", "retriever", "iter_rounds", "answer_tokens", "dtype",
                "bon_n", "prm", "rollout")
        diff = [k for k in keys if old.get(k) != cfg.get(k)]
        diff += [k for k, default in LATER_KEYS.items() if old.get(k, default) != cfg.get(k, default)]
        # folders written before the fingerprint existed lack it: only a fingerprint that is there can differ
        diff += [f"fingerprint.{k}" for k, v in old.get("fingerprint", {}).items()
                 if v != cfg.get("fingerprint", {}).get(k)]
        if diff:
            raise InputError(f"{out_dir} holds an eval with other settings ({', '.join(diff)} differ); use another "
                             "--out or delete the folder", file=str(path), field=diff[0])


def evaluate(data_path: str | Path, corpus_path: str | Path | None = None, policy: str = "smollm2",
             methods: str | Sequence[str] = DEFAULT_METHODS, split: str = "dev", limit: int | None = None,
             out_dir: str | Path = "runs/eval", retriever: str = "bm25", k: int | None = None, seed: int | None = None,
             manifest: str | Path | None = None, rollout: RolloutConfig | None = None, iter_rounds: int = 2,
             prm: Any = None, bon_n: int = 4, answer_tokens: int = 32, shots: int = 0,
             baseline_results: dict | None = None, baseline_name: str = "baseline",
             model_and_tokenizer=None, use_wandb: bool = True, fractions=None, device: str = "auto",
             dtype: str = "float32") -> dict[str, dict]:
    """Evaluate `policy` with `methods` on one split; returns (and writes) method -> metrics. See module doc."""
    from rag_dpo.data import check_not_trained_on, load_dataset, split_questions
    from rag_dpo.retrieval import build_retriever

    from rag_dpo.agent.baselines import DEMONSTRATIONS
    if not 0 <= shots <= len(DEMONSTRATIONS):
        raise InputError(f"shots must be 0..{len(DEMONSTRATIONS)} (the worked examples there are), got {shots}",
                         field="shots")
    methods = parse_methods(methods)
    out_dir = Path(out_dir)
    rcfg = dataclasses.replace(rollout or RolloutConfig())
    rcfg.k = rcfg.k if k is None else k
    rcfg.seed = rcfg.seed if seed is None else seed
    cfg = EvalConfig(data=str(data_path), corpus=str(corpus_path) if corpus_path else None, policy=str(policy),
                     methods=methods, split=split, limit=limit, retriever=retriever, iter_rounds=iter_rounds,
                     answer_tokens=answer_tokens, shots=shots, dtype=dtype, bon_n=bon_n,
                     prm=prm if isinstance(prm, (str, type(None))) else type(prm).__name__,
                     rollout=config_dict(rcfg))
    cfg_dict = asdict(cfg)
    cfg_dict["fingerprint"] = fingerprint(str(policy))
    if shots:      # the examples' text, as the prompts' (a folder without shots never had them)
        cfg_dict["fingerprint"]["demonstrations"] = stable_hash(DEMONSTRATIONS[:shots])

    ds = load_dataset(data_path, corpus=corpus_path)
    if ds.corpus is None:
        raise InputError("this file has no context paragraphs to search; pass --corpus", file=str(data_path),
                         field="corpus")
    questions = split_questions(ds.questions, split, fractions)
    if limit is not None:
        questions = questions[:limit]
    if not questions:
        raise InputError(f"no questions in split {split!r}", file=str(data_path), field="split")
    ids = [q.id for q in questions]
    check_not_trained_on(manifest, ids)
    check_not_trained_on(_policy_manifest(str(policy)), ids)
    from rag_dpo.retrieval import retriever_manifest
    check_not_trained_on(retriever_manifest(retriever), ids)   # dense:PATH / rerank:PATH / hybrid:PATH trained too

    from rag_dpo.distributed import barrier, is_main, run_sharded
    from rag_dpo.io import repair_jsonl
    _check_config(out_dir, cfg_dict)
    chains_path = out_dir / "chains.jsonl"
    if is_main():   # rank 0 alone writes; the others read after the barrier
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", cfg_dict)
        repair_jsonl(chains_path)
    barrier("eval")

    if model_and_tokenizer is None:
        from rag_dpo.agent.policy import load_policy
        dev = resolve_device(device)
        model_and_tokenizer = load_policy(str(policy), device=dev, dtype=resolve_dtype(dtype, dev))
    model, tok = model_and_tokenizer
    engine = RolloutEngine(model, tok, build_retriever(retriever, ds.corpus), ds.corpus, rcfg,
                           model_name=str(policy), retriever_name=retriever)
    scorer = _load_prm(prm) if "agent-prm-bon" in methods else None

    from rag_dpo.agent.baselines import BASELINES, iter_retgen
    from rag_dpo.train.self_eval import RandomScorer, SelfScorer, score_format
    from rag_dpo.agent.hierarchical import SynthesizerConfig, hierarchical, synthesize
    synth_cfg = SynthesizerConfig(answer_tokens=answer_tokens)
    planned: dict[str, Chain] = {}

    def _hier(e, qs):
        """The planner is the flat agent: where this eval already holds its `agent` chain for a question (the same
        engine and settings), only the synthesizer runs on it instead of rolling the planner out again."""
        if "agent" in methods and not planned and chains_path.exists():
            planned.update((c.question_id, c) for c in read_chains(chains_path) if c.method == "agent")
        have = [q for q in qs if q.id in planned]
        new = {c.question_id: c for c in hierarchical(e, [q for q in qs if q.id not in planned], synth_cfg)} \
            if len(have) < len(qs) else {}
        if have:
            t0 = time.perf_counter()
            chains = synthesize(e, [planned[q.id] for q in have], synth_cfg)
            per = (time.perf_counter() - t0) / len(chains)
            for c in chains:
                c.meta["seconds"] = c.meta.get("seconds", 0.0) + per     # the planner's time + the synthesizer's
                new[c.question_id] = c
        return [new[q.id] for q in qs]

    run = {
        "direct": lambda e, qs: BASELINES["direct"](e, qs, max_new_tokens=answer_tokens, shots=shots),
        "rag": lambda e, qs: BASELINES["rag"](e, qs, max_new_tokens=answer_tokens, shots=shots),
        "iter-retgen": lambda e, qs: iter_retgen(e, qs, rounds=iter_rounds, max_new_tokens=answer_tokens,
                                                 shots=shots),
        "agent": _agent,
        "agent-hier": _hier,
        "agent-prm-bon": lambda e, qs: prm_best_of_n(e, qs, scorer, n=bon_n),
        "agent-self-bon": lambda e, qs: prm_best_of_n(e, qs, SelfScorer(e.model, e.tokenizer,
                                                                         fmt=score_format(policy)), n=bon_n,
                                                      method="agent-self-bon", label="self"),
        "agent-random-bon": lambda e, qs: prm_best_of_n(e, qs, RandomScorer(rcfg.seed), n=bon_n,
                                                        method="agent-random-bon", label="random"),
    }
    done = {(c.method, c.question_id) for c in read_chains(chains_path)} if chains_path.exists() else set()

    from tqdm.auto import tqdm
    bs = engine.questions_per_call()    # batch_size, or a full decode batch (decode_rows) for the cached engine
    total = len(methods) * len(questions)
    with tqdm(total=total, initial=sum(1 for m in methods for q in ids if (m, q) in done), unit="chain",
              desc="eval", disable=not is_main()) as bar:
        for method in sorted(methods, key=lambda m: m == "agent-hier"):     # agent first: agent-hier reuses it
            todo = [q for q in questions if (method, q.id) not in done]
            bar.set_postfix(method=method)

            def batches(qs, method=method):
                for b in range(0, len(qs), bs):
                    yield run[method](engine, qs[b:b + bs])

            def write(chains):
                append_chains(chains_path, chains)
                bar.update(len(chains))
            run_sharded(todo, batches, write, stage=f"eval {method}", unit=bs)

    wanted = set(ids)
    by_method: dict[str, list[Chain]] = {m: [] for m in methods}
    for c in read_chains(chains_path):
        if c.method in by_method and c.question_id in wanted:
            by_method[c.method].append(c)
    results = {m: summarize(by_method[m]) for m in methods}
    if not is_main():
        return results

    from rag_dpo.eval.report import plot_results, results_table
    atomic_write_json(out_dir / "results.json", results)
    table = results_table(results, baseline_results, baseline_name)
    (out_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    plot = plot_results(results, out_dir / "results.png", title=f"{Path(str(policy)).name} on {Path(str(data_path)).name} ({split})")
    if use_wandb:
        _log_wandb(cfg_dict, results, by_method, plot, out_dir)
    return results


CHAIN_COLUMNS = ("method", "question_id", "question", "gold", "prediction", "em", "f1", "steps", "parse_error", "path")


def chain_rows(by_method: dict[str, list[Chain]]) -> list[list]:
    """One wandb table row per chain (CHAIN_COLUMNS): its scores and its selected path step by step."""
    rows = []
    for m, chains in by_method.items():
        for c in chains:
            s = chain_scores(c)
            steps = "\n".join(f"[{st.action}] {st.text}" + (f"\n  retrieved: {', '.join(st.retrieved_ids)}"
                                                            if st.retrieved_ids else "")
                              + (f"\n  parse error: {st.parse_error}" if st.parse_error else "")
                              for st in c.path())
            rows.append([m, c.question_id, c.question, " | ".join(c.gold_answers), c.final_answer or "",
                         s["em"], s["f1"], int(s["steps"]), bool(s["parse_error"]), steps])
    return rows


def _log_wandb(cfg: dict, results: dict, by_method: dict[str, list[Chain]], plot: Path, out_dir: Path) -> None:
    from rag_dpo import tracking
    run = tracking.init_run("eval", config=cfg, job_type="eval", dir=out_dir)
    if run is None:
        return
    tracking.log(run, {f"{m}/{k}": v for m, r in results.items() for k, v in r.items()})
    tracking.log_table(run, "results", ["method", *METRICS], [[m, *[r.get(k) for k in METRICS]] for m, r in results.items()])
    tracking.log_table(run, "chains", list(CHAIN_COLUMNS), chain_rows(by_method))
    tracking.log_image(run, "results_plot", plot)
    tracking.finish(run)


def bf16_erased_change(model, reference) -> dict[str, float]:
    """How much of `model`'s change from `reference` (same architecture, e.g. a fine-tune and its starting point)
    survives casting both to bfloat16: `erased` = share of changed weights whose bf16 values are equal (the change
    is below half a bf16 step of the weight), `rel_error` = |bf16 change - fp32 change| / |fp32 change| over all
    changed tensors. Why eval defaults to float32: the compare's LoRA arms moved their weights by far less than bf16's
    3 significant digits (93-94 % erased), so a bf16 eval scored mostly the starting point (README, Evaluation)."""
    import torch
    ref = dict(reference.named_parameters())
    changed = erased = 0
    err = norm = 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            q = ref.get(name)
            if q is None or q.shape != p.shape:
                continue
            a, b = p.detach().float(), q.detach().float()
            d = a - b
            moved = d != 0
            if not moved.any():
                continue
            d16 = a.bfloat16().float() - b.bfloat16().float()
            changed += int(moved.sum())
            erased += int((moved & (d16 == 0)).sum())
            err += float((d16 - d).pow(2).sum())
            norm += float(d.pow(2).sum())
    return {"changed": float(changed), "erased": erased / changed if changed else 0.0,
            "rel_error": (err / norm) ** 0.5 if norm else 0.0}
