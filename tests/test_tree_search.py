"""Tree search with a scripted engine (K siblings, continue from the best, stop at an answer), oracle chains on a
tiny corpus, and one end-to-end run with the tiny model through the real RolloutEngine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rag_dpo.annotate.annotators import AnnotatorConfig, EvidenceAnnotator, OutcomeAnnotator, RolloutAnnotator
from rag_dpo.annotate.oracle import oracle_chains, oracle_report
from rag_dpo.annotate.tree_search import TreeSearchConfig, tree_search, tree_search_to_file
from rag_dpo.errors import InputError
from rag_dpo.records import ANSWER, SEARCH, Chain, Corpus, Passage, Question, Step, read_chains


class ScriptedEngine:
    """Candidate 1 of each prefix finds the next supporting passage (or answers right once all are found);
    the others retrieve junk."""

    def __init__(self, max_steps=4):
        self.cfg = SimpleNamespace(max_steps=max_steps)
        self.calls = 0

    def new_chain(self, q):
        return Chain(question_id=q.id, question=q.question, gold_answers=q.answers, supporting_ids=q.supporting_ids)

    def sample_next_steps(self, items, n):
        self.calls += 1
        out = []
        next_id: dict[int, int] = {}
        for chain, parent in items:
            depth = len(chain.path(parent)) if parent is not None else 0
            base = next_id.setdefault(id(chain), len(chain.steps))
            next_id[id(chain)] = base + n
            steps = []
            for j in range(n):
                sid = str(base + j)
                if n == 1:   # a continuation (finish): answers, right iff its path retrieved a supporting passage
                    found = any(p.retrieved_ids[0] in chain.supporting_ids for p in chain.path(parent) if p.retrieved_ids)
                    ans = chain.gold_answers[0] if found else "wrong"
                    steps.append(Step(id=sid, parent=parent, text=f"<answer>{ans}</answer>", action=ANSWER, answer=ans,
                                      generated_tokens=2))
                elif j == 1 and depth >= len(chain.supporting_ids):
                    steps.append(Step(id=sid, parent=parent, text=f"<answer>{chain.gold_answers[0]}</answer>",
                                      action=ANSWER, answer=chain.gold_answers[0], generated_tokens=3))
                elif j == 1:
                    pid = chain.supporting_ids[depth]
                    steps.append(Step(id=sid, parent=parent, text=f"<search>{pid}</search>", action=SEARCH,
                                      query=pid, retrieved_ids=[pid], generated_tokens=4))
                else:
                    steps.append(Step(id=sid, parent=parent, text=f"<search>junk {sid}</search>", action=SEARCH,
                                      query=f"junk {sid}", retrieved_ids=[f"junk{j}"], generated_tokens=4))
            out.append(steps)
        return out


def questions(n=3):
    return [Question(id=f"q{i}", question=f"question {i}?", answers=[f"ans {i}"], supporting_ids=["a", "b"])
            for i in range(n)]


def test_tree_search_keeps_siblings_and_follows_best():
    eng = ScriptedEngine()
    chains = tree_search(questions(), eng, EvidenceAnnotator(), TreeSearchConfig(k=3, progress=False))
    assert eng.calls == 3                        # one batched call per depth for all questions
    for c in chains:
        assert len(c.steps) == 9                 # 3 depths x K=3 candidates
        path = c.path()
        assert [s.query or s.answer for s in path] == ["a", "b", c.gold_answers[0]]
        assert path[-1].id == c.selected and path[-1].action == ANSWER
        for s in path:                           # each prefix on the best path holds K siblings
            assert len(c.children(s.parent)) == 3
        assert all("evidence" in s.labels for s in c.steps)
        assert c.method == "tree-search"


def test_tree_search_final_k_samples_more_candidates_at_the_last_step():
    """final_k: the last depth (where the chain must answer) gets its own candidate count; earlier depths keep k."""
    chains = tree_search(questions(2), ScriptedEngine(max_steps=3), EvidenceAnnotator(),
                         TreeSearchConfig(k=2, final_k=5, progress=False))
    for c in chains:
        path = c.path()
        assert [len(c.children(s.parent)) for s in path] == [2, 2, 5]
        assert path[-1].action == ANSWER and path[-1].labels["evidence"].value == 1.0
        assert c.meta["tree_search"]["final_k"] == 5
    plain = tree_search(questions(1), ScriptedEngine(max_steps=3), EvidenceAnnotator(),
                        TreeSearchConfig(k=2, progress=False))[0]
    assert len(plain.steps) == 6 and "final_k" not in plain.meta["tree_search"]


def test_tree_search_step_limit_and_refuses_outcome():
    chains = tree_search(questions(1), ScriptedEngine(max_steps=2), EvidenceAnnotator(),
                         TreeSearchConfig(k=2, progress=False))
    assert len(chains[0].path()) == 2 and chains[0].path()[-1].action == SEARCH
    with pytest.raises(InputError, match="cannot guide tree search"):
        tree_search(questions(1), ScriptedEngine(), OutcomeAnnotator(), TreeSearchConfig(progress=False))


def test_tree_search_finish_completes_losers_into_outcome_data(tokenizer):
    """finish=True: every losing search step is sampled on to an answer, so the tree holds right and wrong whole
    chains (outcome pairs, SFT rows) while the best path and the step pairs stay what they were."""
    from rag_dpo.pairs.builders import PairConfig, finished_paths, outcome_pairs, step_pairs
    plain = tree_search(questions(1), ScriptedEngine(), EvidenceAnnotator(), TreeSearchConfig(k=3, progress=False))[0]
    eng = ScriptedEngine()
    c = tree_search(questions(1), eng, EvidenceAnnotator(), TreeSearchConfig(k=3, finish=True, progress=False))[0]
    assert eng.calls == 4                        # 3 depths + one batched call for all 6 losers (each answers at once)
    assert len(c.steps) == 9 + 6 and all("evidence" in s.labels for s in c.steps)
    assert [s.id for s in c.path()] == [s.id for s in plain.path()]   # the best path is unchanged
    assert all(leaf.action == ANSWER for leaf in c.leaves())
    f1s = sorted(s[-1].answer == c.gold_answers[0] for s in finished_paths(c))
    assert f1s == [False, False, True, True, True, True, True]   # 2 losers at depth 1 found nothing: wrong
    assert len(step_pairs([c], tokenizer, PairConfig(), "evidence")) == \
        len(step_pairs([plain], tokenizer, PairConfig(), "evidence"))
    assert outcome_pairs([plain], tokenizer, PairConfig()) == []       # without finish: no wrong finished path
    assert len(outcome_pairs([c], tokenizer, PairConfig())) == 1


def test_tree_search_to_file_resumes(tmp_path):
    out = tmp_path / "trees.jsonl"
    tree_search_to_file(questions(2), ScriptedEngine(), EvidenceAnnotator(), out,
                        TreeSearchConfig(k=2, batch_questions=1, progress=False))
    eng = ScriptedEngine()
    tree_search_to_file(questions(3), eng, EvidenceAnnotator(), out,
                        TreeSearchConfig(k=2, batch_questions=1, progress=False))
    assert [c.question_id for c in read_chains(out)] == ["q0", "q1", "q2"]
    assert eng.calls == 3                        # only q2 was searched


class ListRetriever:
    """Tiny keyword retriever: passages ranked by word overlap with the query."""

    name = "overlap"

    def __init__(self, corpus):
        self.corpus = corpus

    def search(self, queries, k):
        out = []
        for q in queries:
            words = set(q.lower().split())
            scored = [(p.id, len(words & set(f"{p.title} {p.text}".lower().split()))) for p in self.corpus]
            scored = [x for x in sorted(scored, key=lambda x: -x[1]) if x[1] > 0]
            out.append([(pid, float(s)) for pid, s in scored[:k]])
        return out


def test_oracle_chains_and_report(tokenizer):
    corpus = Corpus([Passage("jaws", "Jaws", "Jaws is a film directed by Steven Spielberg."),
                     Passage("spielberg", "Steven Spielberg", "Spielberg was born in Cincinnati."),
                     Passage("shark", "Shark", "Sharks live in the ocean. Jaws"),
                     Passage("cinci", "Cincinnati", "A city in Ohio.")])
    qs = [Question("q1", "Where was the director of Jaws born?", ["Cincinnati"], ["jaws", "spielberg"]),
          Question("q2", "No support?", ["x"], []),
          Question("q3", "Which city is in Ohio?", ["Cincinnati"], ["cinci"])]
    chains = oracle_chains(qs, corpus, ListRetriever(corpus), tokenizer, k=1)
    assert [c.question_id for c in chains] == ["q1", "q3"]
    c = chains[0]
    assert [s.action for s in c.path()] == [SEARCH, SEARCH, ANSWER]
    assert c.path()[0].retrieved_ids == ["jaws"] and c.path()[1].retrieved_ids == ["spielberg"]
    assert "<search>Jaws</search>" in c.path()[0].text and c.path()[-1].answer == "Cincinnati"
    assert "[1] Jaws:" in c.path()[0].observation and c.selected == c.path()[-1].id
    assert c.path()[0].policy_span is not None and c.path()[0].info_span is not None
    rep = oracle_report(chains, n_questions=len(qs))
    assert rep["skipped"] == 1 and rep["search_steps"] == 3
    assert rep["query_hit_rate"] == 1.0 and rep["support_recall"] == 1.0


def test_oracle_falls_back_to_title_plus_question(tokenizer):
    corpus = Corpus([Passage("a", "Paris", "Paris is the capital of France."),
                     Passage("b", "Paris", "Paris Hilton is a heiress and celebrity")])
    qs = [Question("q", "Which heiress is named Paris?", ["Paris Hilton"], ["b"])]
    c = oracle_chains(qs, corpus, ListRetriever(corpus), tokenizer, k=1)[0]
    assert c.path()[0].query.startswith("Paris ") and "heiress" in c.path()[0].query
    assert c.meta["oracle"][0]["hit"] is True


def test_end_to_end_tiny_model_real_engine(tiny_model_and_tokenizer):
    from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
    model, tok = tiny_model_and_tokenizer
    corpus = Corpus([Passage("a", "Alpha", "alpha text"), Passage("b", "Beta", "beta text")])
    eng = RolloutEngine(model, tok, ListRetriever(corpus), corpus,
                        RolloutConfig(max_steps=2, max_new_tokens=6, batch_size=8, progress=False))
    qs = [Question("q1", "alpha?", ["alpha"], ["a"]), Question("q2", "beta?", ["beta"], ["b"])]
    chains = tree_search(qs, eng, EvidenceAnnotator(), TreeSearchConfig(k=2, progress=False))
    for c in chains:
        assert len(c.children(None)) == 2 and c.selected is not None
        assert all("evidence" in s.labels for s in c.steps)
    # A random tiny model writes invalid steps, which the rollout annotator scores 0 without any rollout; a
    # hand-written search step makes `continue_from` really run from it (its continuations fail: F1 0).
    c = chains[0]
    probe = Step(id="99", parent=None, text="<think>t</think>\n<search>alpha</search>", action=SEARCH,
                 query="alpha", retrieved_ids=["a"], observation="\n<information>\n[1] Alpha: alpha text\n"
                 "</information>\n", generated_tokens=9)
    c.add_step(probe)
    tokens_before = eng.stats["generated_tokens"]
    ann = RolloutAnnotator(eng, AnnotatorConfig(rollouts=2))
    ann.annotate(chains)
    assert all("rollout" in s.labels for c in chains for s in c.steps)
    lab = probe.labels["rollout"]
    assert lab.cost["rollouts"] == 2 and len(lab.info["returns"]) == 2
    assert lab.cost["generated_tokens"] > 0
    assert eng.stats["generated_tokens"] - tokens_before == lab.cost["generated_tokens"]   # cost = what it generated
    assert lab.value == 0.0 and lab.info["returns"] == [0.0, 0.0]   # failed continuations are wrong answers
    for s in c.steps:
        if s.action != SEARCH:
            assert s.labels["rollout"].value == 0.0 and s.labels["rollout"].cost["rollouts"] == 0
