"""Oracle chains: gold-evidence demonstrations for the SFT warm start (small policies do not follow the search
protocol zero-shot).

For each supporting passage not yet retrieved on the chain, one search step whose query should retrieve it: the
passage's title, or, when the title alone does not bring it into the top k, the title plus the question's content
words; then one answer step with the first gold answer. Steps are written with `protocol.format_step` and
observed with `protocol.format_observation`, exactly as the rollout engine would, and their token spans come from
`protocol.tokenize_path`. All queries of a round are one batched `retriever.search` call.

Every search step records in `chain.meta["oracle"]` which passage it targeted and whether its query retrieved it;
`oracle_report` sums that up (how often the oracle queries actually find the gold passage). Questions without
gold answers or supporting ids cannot have an oracle chain; they are counted in the report, not hidden.
"""

from __future__ import annotations

import re
from typing import Sequence

from rag_dpo.agent import protocol
from rag_dpo.records import ANSWER, SEARCH, Chain, Corpus, Question, Step

_STOP = frozenset("""a an the of in on at to for from by with and or is are was were be been which who whom whose
what when where why how did does do that this these those as it its than then there their his her they he she
""".split())


def content_words(text: str, drop: str = "") -> list[str]:
    dropped = {w.lower() for w in re.findall(r"\w+", drop)}
    words = [w for w in re.findall(r"\w+", text) if w.lower() not in _STOP and w.lower() not in dropped]
    return list(dict.fromkeys(words))


def oracle_queries(question: str, title: str) -> list[str]:
    """Queries to try for one supporting passage, in order."""
    extra = " ".join(content_words(question, drop=title))
    return [title] + ([f"{title} {extra}"] if extra else [])


def oracle_chains(questions: Sequence[Question], corpus: Corpus, retriever, tokenizer=None, k: int = 3,
                  max_tokens_per_passage: int = 64) -> list[Chain]:
    """One oracle chain per question that has gold answers and supporting passages in `corpus`."""
    usable = [q for q in questions if q.answers and [p for p in q.supporting_ids if p in corpus]]
    plans = {q.id: [corpus[p] for p in q.supporting_ids if p in corpus] for q in usable}
    # Pick each passage's query: the first candidate (tried in batched rounds) whose top k contains it.
    choice: dict[tuple[str, str], tuple[str, list[str], bool]] = {}
    pending = [(q, p, oracle_queries(q.question, p.title or p.text[:60])) for q in usable for p in plans[q.id]]
    rnd = 0
    while pending:
        hits = retriever.search([cands[rnd] for _, _, cands in pending], k)
        still = []
        for (q, p, cands), h in zip(pending, hits):
            ids = [pid for pid, _ in h]
            hit = p.id in ids
            if hit or (q.id, p.id) not in choice:   # the title query stays as the fallback unless a later one hits
                choice[(q.id, p.id)] = (cands[rnd], ids, hit)
            if not hit and rnd + 1 < len(cands):
                still.append((q, p, cands))
        pending, rnd = still, rnd + 1

    chains = []
    for q in usable:
        chain = Chain(question_id=q.id, question=q.question, gold_answers=list(q.answers),
                      supporting_ids=list(q.supporting_ids), method="oracle",
                      retriever=getattr(retriever, "name", type(retriever).__name__),
                      sampling={"k": k, "max_tokens_per_passage": max_tokens_per_passage})
        seen: set[str] = set()
        record = []
        for p in plans[q.id]:
            if p.id in seen:
                continue
            query, ids, hit = choice[(q.id, p.id)]
            title = p.title or "this"
            step = Step(id=chain.new_step_id(), parent=chain.steps[-1].id if chain.steps else None,
                        text=protocol.format_step(f"I need to find information about {title}.", SEARCH, query),
                        action=SEARCH, query=query, retrieved_ids=ids,
                        observation=protocol.format_observation([corpus[i] for i in ids if i in corpus], tokenizer,
                                                                max_tokens_per_passage))
            chain.add_step(step)
            seen.update(ids)
            record.append({"target": p.id, "query": query, "hit": hit, "title_only": query == title})
        answer = q.answers[0]
        chain.add_step(Step(id=chain.new_step_id(), parent=chain.steps[-1].id if chain.steps else None,
                            text=protocol.format_step("The retrieved passages contain the answer.", ANSWER, answer),
                            action=ANSWER, answer=answer))
        chain.selected = chain.steps[-1].id
        chain.meta["oracle"] = record
        if tokenizer is not None:
            tp = protocol.tokenize_path(tokenizer, q.question, chain.steps)
            for s, span, info in zip(chain.steps, tp.step_spans, tp.info_spans):
                s.policy_span, s.info_span = list(span), list(info) if info else None
        chains.append(chain)
    return chains


def oracle_report(chains: Sequence[Chain], n_questions: int | None = None) -> dict:
    """How often oracle queries retrieve their target, and supporting-passage recall of the chains."""
    records = [r for c in chains for r in c.meta.get("oracle", [])]
    recalls = []
    for c in chains:
        got = {pid for s in c.steps for pid in s.retrieved_ids}
        sup = set(c.supporting_ids)
        recalls.append(len(got & sup) / len(sup) if sup else 1.0)
    return {"questions": n_questions if n_questions is not None else len(chains), "chains": len(chains),
            "skipped": (n_questions - len(chains)) if n_questions is not None else 0,
            "search_steps": len(records),
            "query_hit_rate": sum(r["hit"] for r in records) / len(records) if records else 0.0,
            "title_query_share": sum(r["title_only"] for r in records) / len(records) if records else 0.0,
            "support_recall": sum(recalls) / len(recalls) if recalls else 0.0}
