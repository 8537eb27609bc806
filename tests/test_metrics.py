"""Answer and retrieval metrics against hand-worked cases (SQuAD/HotpotQA normalisation, max over aliases)."""

from __future__ import annotations

import pytest

from rag_dpo.metrics import (answer_scores, answer_seen, average, breakdown, cover_exact_match, exact_match,
                             f1_score, normalize_answer, support_precision, support_recall)


def test_normalisation_lowercase_punctuation_articles_whitespace():
    assert normalize_answer("  The  Beatles!! ") == "beatles"
    assert normalize_answer("U.S.") == "us"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"            # articles only as whole words
    assert normalize_answer("the") == ""


def test_exact_match():
    assert exact_match("The Beatles.", ["beatles"]) == 1.0
    assert exact_match("U.S.", ["US"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert exact_match(None, ["x"]) == 0.0
    assert exact_match("x", []) == 0.0


def test_f1_hand_worked():
    # "eiffel tower" vs "eiffel tower in paris": 2 common tokens, P = 2/2, R = 2/4, F1 = 2*1*0.5/1.5 = 2/3.
    assert f1_score("the Eiffel Tower", ["Eiffel tower in Paris"]) == pytest.approx(2 / 3)
    # Repeated tokens count with multiplicity: "paris paris" vs "paris": common 1, P = 1/2, R = 1, F1 = 2/3.
    assert f1_score("Paris Paris", ["Paris"]) == pytest.approx(2 / 3)
    assert f1_score("London", ["Paris"]) == 0.0
    assert f1_score("", ["Paris"]) == 0.0


def test_yes_no_must_match_exactly():
    assert f1_score("yes", ["no"]) == 0.0
    assert f1_score("yes it is", ["yes"]) == 0.0                 # a yes/no gold needs exactly yes/no
    assert f1_score("no", ["no way"]) == 0.0                      # and a yes/no prediction an equal gold
    assert f1_score("Yes.", ["yes"]) == 1.0
    assert exact_match("Yes.", ["yes"]) == 1.0


def test_max_over_aliases():
    golds = ["New York City", "NYC", "the Big Apple"]
    assert exact_match("nyc", golds) == 1.0
    assert f1_score("big apple", golds) == 1.0
    assert f1_score("New York", golds) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))  # best alias: 0.8
    assert cover_exact_match("I think it is the Big Apple.", golds) == 1.0


def test_cover_em_whole_token_spans():
    assert cover_exact_match("He was born in Paris, France.", ["Paris"]) == 1.0
    assert cover_exact_match("a Parisian cafe", ["Paris"]) == 0.0     # not a whole-token span
    assert cover_exact_match("Paris", ["Paris, France"]) == 0.0       # gold longer than prediction
    assert cover_exact_match("the", ["the"]) == 0.0                   # gold normalising to nothing never matches
    assert cover_exact_match("chief of protocol of the US", ["Chief of Protocol"]) == 1.0
    assert answer_scores("The Chief of Protocol", ["Chief of Protocol"]) == {"em": 1.0, "f1": 1.0, "cover_em": 1.0}
    assert answer_scores(None, ["x"]) == {"em": 0.0, "f1": 0.0, "cover_em": 0.0}


def test_answer_seen_in_what_the_agent_read():
    """Whole normalised tokens of any alias anywhere in the observations; a cut-off answer is not seen; yes/no golds
    (no passage states them) are not applicable (None), and neither is an answer normalising to nothing."""
    obs = ["\n<information>\n[1] Eiffel Tower: The tower is in Paris, France ...\n</information>\n",
           "\n<information>\n[1] Lyon: A city ...\n</information>\n"]
    assert answer_seen(obs, ["Paris"]) == 1.0
    assert answer_seen(obs, ["Marseille", "the city of Lyon"]) == 0.0      # alias longer than what was read
    assert answer_seen(obs, ["Marseille", "LYON."]) == 1.0
    assert answer_seen(obs, ["Pari"]) == 0.0                               # not a whole-token span
    assert answer_seen(["[1] X: founded in 1887 by ..."], ["1887"]) == 1.0
    assert answer_seen(["[1] X: founded in 18 ..."], ["1887"]) == 0.0      # cut by the token budget
    assert answer_seen(obs, ["yes"]) is None and answer_seen(obs, ["No"]) is None and answer_seen(obs, ["the"]) is None
    assert answer_seen([], ["Paris"]) == 0.0


def test_eval_summary_answer_seen_and_reader_em():
    """answer_seen over the questions a passage can answer, em_when_seen over those that saw it."""
    from rag_dpo.eval.evaluate import summarize
    from rag_dpo.records import Chain, Step

    def chain(gold, read, answer):
        s0 = Step("0", None, "s", "search", query="q", observation=f"<information>[1] T: {read}</information>")
        return Chain("q", "Q?", [gold], [], [s0, Step("1", "0", "a", "answer", answer=answer)], selected="1")

    res = summarize([chain("Paris", "in Paris", "Paris"), chain("Paris", "in Paris", "Lyon"),
                     chain("Rome", "in Milan", "Rome"), chain("yes", "nothing", "yes")])
    assert res["answer_seen"] == pytest.approx(2 / 3) and res["em_when_seen"] == pytest.approx(1 / 2)
    assert res["em"] == pytest.approx(3 / 4)


def test_support_recall_and_precision_at_k():
    retrieved = ["a", "b", "c", "d"]
    supporting = ["c", "e"]
    assert support_recall(retrieved, supporting, k=2) == 0.0
    assert support_recall(retrieved, supporting, k=3) == 0.5
    assert support_recall(retrieved, supporting) == 0.5
    assert support_recall(["c", "e"], ["c", "e", "c"], k=2) == 1.0   # duplicate supporting ids count once
    assert support_recall([], []) == 1.0
    assert support_precision(retrieved, supporting, k=3) == pytest.approx(1 / 3)
    assert support_precision(["c", "c", "a"], ["c"]) == 0.5          # duplicates in the ranking count once
    assert support_precision([], ["c"]) == 0.0


def test_breakdown_by_hops_and_type():
    rows = [{"id": "1", "hops": 2, "type": "bridge", "recall": 1.0, "em": 1.0},
            {"id": "2", "hops": 2, "type": "comparison", "recall": 0.5, "em": 0.0},
            {"id": "3", "hops": 3, "type": "bridge", "recall": 0.0, "em": 0.0},
            {"id": "4", "hops": None, "type": None, "recall": 1.0, "em": 1.0},
            {"id": "5", "hops": 10, "type": "bridge", "recall": 1.0, "em": 0.0}]
    by_hops = breakdown(rows, "hops")
    assert list(by_hops) == ["2", "3", "10", "unknown"]              # numeric order, unknown last
    assert by_hops["2"] == {"n": 2, "recall": 0.75, "em": 0.5}
    assert by_hops["unknown"]["n"] == 1
    by_type = breakdown(rows, "type")
    assert by_type["bridge"] == {"n": 3, "recall": pytest.approx(2 / 3), "em": pytest.approx(1 / 3)}
    assert breakdown(rows, "type", metrics=["em"])["comparison"] == {"n": 1, "em": 0.0}
    assert average(rows) == {"n": 5, "recall": 0.7, "em": 0.4}      # hop counts (ints) are not metrics
    assert breakdown([], "hops") == {}
