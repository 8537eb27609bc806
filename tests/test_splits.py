"""Splits are deterministic, disjoint, cover everything and follow the fractions; the training manifest guard
refuses evaluation questions a model was trained on."""

from __future__ import annotations

import hashlib
import json

import pytest

from rag_dpo.data import (DEFAULT_FRACTIONS, MANIFEST_NAME, assign_split, check_not_trained_on, load_dataset,
                          read_manifest, split_questions, write_manifest)
from rag_dpo.errors import InputError
from rag_dpo.paths import DEFAULT_DATA
from rag_dpo.records import Question


@pytest.fixture(scope="module")
def questions():
    return load_dataset(DEFAULT_DATA).questions


def test_assignment_is_the_documented_hash():
    qid = "5a8c7595554299585d9e36b6"
    x = int(hashlib.sha256(qid.encode()).hexdigest()[:16], 16) / 2 ** 64
    expected = "train" if x < 0.7 else "dev" if x < 0.85 else "test"
    assert assign_split(qid) == assign_split(qid, DEFAULT_FRACTIONS) == expected
    assert assign_split(qid, {"train": 0, "dev": 0, "test": 1}) == "test"
    assert assign_split(qid, (1, 0, 0)) == "train"


def test_splits_disjoint_cover_and_sized(questions):
    parts = {s: split_questions(questions, s) for s in ("train", "dev", "test")}
    ids = {s: {q.id for q in qs} for s, qs in parts.items()}
    assert not (ids["train"] & ids["dev"]) and not (ids["train"] & ids["test"]) and not (ids["dev"] & ids["test"])
    assert ids["train"] | ids["dev"] | ids["test"] == {q.id for q in questions}
    assert len(split_questions(questions, "all")) == len(questions) == 500
    n = len(questions)
    for s, frac in DEFAULT_FRACTIONS.items():
        assert abs(len(parts[s]) / n - frac) < 0.06, (s, len(parts[s]))
    assert [len(parts[s]) for s in ("train", "dev", "test")] == [370, 65, 65]     # pinned: stable across runs


def test_split_independent_of_order_and_other_questions(questions):
    test = {q.id for q in split_questions(questions, "test")}
    assert {q.id for q in split_questions(questions[::-1], "test")} == test
    assert {q.id for q in split_questions(questions[:100], "test")} == {q.id for q in questions[:100]} & test


def test_configurable_fractions(questions):
    half = split_questions(questions, "train", fractions="0.5,0.25,0.25")
    assert 0.44 < len(half) / len(questions) < 0.56
    assert {q.id for q in half} <= {q.id for q in split_questions(questions, "train")}   # nested by construction


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (0.7, 0.3), {"train": 1.0, "val": 0.0}, "a,b,c",
                                       (1.2, -0.1, -0.1)])
def test_bad_fractions(fractions):
    with pytest.raises(InputError) as e:
        split_questions([Question("a", "q", ["x"])], "train", fractions)
    assert e.value.field == "fractions"


def test_unknown_split():
    with pytest.raises(InputError) as e:
        split_questions([], "validation")
    assert e.value.field == "split"


def test_manifest_guard(tmp_path, questions):
    train = split_questions(questions, "train")
    test = split_questions(questions, "test")
    model = tmp_path / "model"
    model.mkdir()
    path = write_manifest(model, [q.id for q in train], data_files=[DEFAULT_DATA], fractions=DEFAULT_FRACTIONS)
    assert path == model / MANIFEST_NAME
    m = read_manifest(model)
    assert len(m.question_ids) == len(train) and m.data_files[0]["sha256"] and m.fractions == DEFAULT_FRACTIONS
    check_not_trained_on(model, [q.id for q in test])                        # disjoint: passes
    with pytest.raises(InputError) as e:
        check_not_trained_on(path, [q.id for q in test] + [train[0].id, train[1].id])
    msg = str(e.value)
    assert "2 of the" in msg and train[0].id in msg and e.value.file == str(path)
    with pytest.raises(InputError):
        check_not_trained_on([train[0].id], [train[0].id])                   # plain id lists work too
    base = tmp_path / "base_model"
    base.mkdir()
    check_not_trained_on(base, [q.id for q in train])                        # no manifest: nothing to refuse


def test_manifest_inherits_base_model(tmp_path):
    sft = tmp_path / "sft"
    sft.mkdir()
    write_manifest(sft, ["a", "b"])
    dpo = write_manifest(tmp_path / "dpo" / MANIFEST_NAME, ["c", "a"], inherit_from=[sft, tmp_path / "none"])
    m = read_manifest(dpo)
    assert m.question_ids == ["c", "a", "b"] and m.inherited_from == [str(sft / MANIFEST_NAME)]
    with pytest.raises(InputError) as e:
        check_not_trained_on(dpo, ["b"])
    assert "1 of the 1" in str(e.value)


def test_bad_manifest(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"ids": []}))
    with pytest.raises(InputError) as e:
        check_not_trained_on(f, ["a"])
    assert e.value.field == "question_ids"
    with pytest.raises(InputError) as e:
        check_not_trained_on(tmp_path / "missing.json", ["a"])
    assert "not found" in str(e.value)
