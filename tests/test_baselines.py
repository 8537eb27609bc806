"""Baselines: direct, rag and iter-retgen run end to end on a tiny model; plain replies count as answers."""

from __future__ import annotations

import pytest

from rag_dpo.agent.baselines import BASELINES, DEMONSTRATIONS, _prompt_ids, answer_step, iter_retgen, plain_answer
from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
from rag_dpo.records import ANSWER, INVALID, SEARCH, Corpus, Passage, Question


class ToyRetriever:
    name = "toy"

    def search(self, queries, k):
        return [[(f"p{(len(q) + j) % 4}", 1.0) for j in range(k)] for q in queries]


@pytest.fixture()
def engine(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    corpus = Corpus([Passage(f"p{i}", f"Title {i}", f"Passage {i} text.") for i in range(4)])
    cfg = RolloutConfig(max_new_tokens=5, k=2, batch_size=4, progress=False)
    return RolloutEngine(model, tok, ToyRetriever(), corpus, cfg, model_name="tiny")


QUESTIONS = [Question("a", "Who wrote Hamlet?", ["Shakespeare"], ["p1"]),
             Question("b", "Where is Paris?", ["France"], ["p2"])]


def test_plain_answers_are_accepted_and_flagged():
    s = answer_step("0", None, "<think>x</think><answer>William Shakespeare</answer>", 9)
    assert (s.action, s.answer, s.parse_error) == (ANSWER, "William Shakespeare", None)
    s = answer_step("0", None, "Answer: William Shakespeare.\nHe wrote it in 1600.", 9)
    assert (s.action, s.answer) == (ANSWER, "William Shakespeare") and "no <answer> tag" in s.parse_error
    assert answer_step("0", None, "  \n ", 3).action == INVALID
    assert plain_answer("The answer is: Paris") == "Paris"
    # seen from the base model: the lead-in alone on its line, the answer under it behind a passage or list mark
    assert plain_answer("The answer is:\n[4] United States Vice President.") == "United States Vice President"
    assert plain_answer("The answer is: 1. ExxonMobil and Mobil Producing Nigeria.") == \
        "ExxonMobil and Mobil Producing Nigeria"
    assert plain_answer("1,462") == "1,462" and plain_answer("1.5 million") == "1.5 million"


def test_worked_examples_come_before_the_question_as_earlier_turns(engine):
    """shots=2 puts both examples (question, their passages only when this question has passages, the tagged
    answer as the assistant's turn) before the question; shots=0 is the plain prompt, unchanged."""
    tok = engine.tokenizer
    obs = "\n<information>\n[1] Title 1: Passage 1 text.\n</information>\n"
    plain = tok.decode(_prompt_ids(engine, "Who wrote Hamlet?", obs))
    shown = tok.decode(_prompt_ids(engine, "Who wrote Hamlet?", obs, shots=2))
    closed = tok.decode(_prompt_ids(engine, "Who wrote Hamlet?", None, shots=2))
    assert DEMONSTRATIONS[0][1] not in plain and shown.endswith(plain[plain.index("Passages:"):])
    last = shown.index("Who wrote Hamlet?")
    for passages, q, a in DEMONSTRATIONS:
        assert shown.index(q) < shown.index(f"<answer>{a}</answer>") < last
        assert passages.split("\n")[1][:30] in shown and passages.split("\n")[1][:30] not in closed
    assert shown.count("Passages:") == 3 and "Passages:" not in closed
    assert closed.count("<answer>") == 1 + 2             # the system prompt names the tag, then the two examples


@pytest.mark.parametrize("name", ["direct", "rag", "iter-retgen"])
def test_baseline_end_to_end(engine, name):
    chains = BASELINES[name](engine, QUESTIONS)
    assert [c.question_id for c in chains] == ["a", "b"]
    for c in chains:
        assert c.method == name and c.selected == c.path()[-1].id and c.model == "tiny"
        actions = [s.action for s in c.path()]
        expected = {"direct": 1, "rag": 2, "iter-retgen": 4}[name]
        assert len(actions) == expected and actions[-1] in (ANSWER, INVALID)
        searches = [s for s in c.path() if s.action == SEARCH]
        assert len(searches) == {"direct": 0, "rag": 1, "iter-retgen": 2}[name]
        for s in searches:
            assert len(s.retrieved_ids) == 2 and "Passage" in s.observation and s.generated_tokens == 0
        assert all(0 < s.generated_tokens <= 5 for s in c.path() if s.action != SEARCH)


def test_iter_retgen_queries_use_previous_generation(engine, monkeypatch):
    """Each round's query is the question plus the previous round's generation (tags stripped); the generations
    are fixed here, so the check cannot pass on an empty reply."""
    replies = iter(["<answer>Stratford  upon\nAvon</answer>", "Ben Jonson", "<answer>Shakespeare</answer>"])
    monkeypatch.setattr(engine, "generate_texts",
                        lambda contexts, seeds, do_sample, max_new_tokens: [(next(replies), 4) for _ in contexts])
    c = iter_retgen(engine, QUESTIONS[:1], rounds=3)[0]
    queries = [s.query for s in c.path() if s.action == SEARCH]
    q = QUESTIONS[0].question
    assert queries == [q, f"{q} Stratford upon Avon", f"{q} Ben Jonson"]
    assert c.final_answer == "Shakespeare" and c.meta["rounds"] == 3
