"""Shared helpers: chain records round-trip, torn-tail repair for resume, config overrides and errors."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from rag_dpo.config import apply_overrides, from_dict, load_config
from rag_dpo.errors import InputError
from rag_dpo.io import append_jsonl, atomic_write_json, iter_jsonl, repair_jsonl, stable_hash
from rag_dpo.records import (ANSWER, CHAIN_VERSION, SEARCH, Chain, Label, Step, append_chains, done_question_ids,
                             read_chains, write_chains)


def _tree() -> Chain:
    c = Chain("q1", "Who?", gold_answers=["Ann"], supporting_ids=["p1"])
    c.add_step(Step("0", None, "<search>a</search>", SEARCH, query="a", retrieved_ids=["p1"]))
    c.add_step(Step("1", None, "<search>b</search>", SEARCH, query="b", retrieved_ids=["p2"]))
    c.add_step(Step("2", "0", "<answer>Ann</answer>", ANSWER, answer="Ann",
                    labels={"evidence": Label(1.0, True, "evidence", {"rollouts": 0})}))
    c.selected = "2"
    return c


def test_chain_tree_navigation():
    c = _tree()
    assert [s.id for s in c.children(None)] == ["0", "1"]
    assert [s.id for s in c.path()] == ["0", "2"]
    assert sorted(s.id for s in c.leaves()) == ["1", "2"]
    assert [s.id for s in c.prefix("2")] == ["0"]
    assert c.final_answer == "Ann"
    with pytest.raises(ValueError):
        c.add_step(Step("0", None, "", SEARCH))


def test_chain_jsonl_round_trip_and_resume_ids(tmp_path):
    path = tmp_path / "chains.jsonl"
    write_chains(path, [_tree()])
    append_chains(path, [Chain("q2", "Where?")])
    back = read_chains(path)
    assert [c.question_id for c in back] == ["q1", "q2"]
    assert back[0].to_dict() == _tree().to_dict()
    assert back[0].steps[2].labels["evidence"].good is True
    # A killed writer leaves a torn last line: resume drops it and still sees finished ids.
    with open(path, "a") as f:
        f.write('{"version": 1, "question_id": "q3"')
    assert done_question_ids(path) == {"q1", "q2"}
    assert path.read_text().endswith("\n")


def test_chain_version_and_field_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    d = _tree().to_dict()
    path.write_text(json.dumps({**d, "version": 99}) + "\n")
    with pytest.raises(InputError) as e:
        read_chains(path)
    assert "line 1" in str(e.value) and "version" in str(e.value)
    d2 = dict(d)
    d2["steps"] = [dict(d["steps"][0], bogus=1)]
    path.write_text(json.dumps(d) + "\n" + json.dumps(d2) + "\n")
    with pytest.raises(InputError) as e:
        read_chains(path)
    assert "line 2" in str(e.value) and "bogus" in str(e.value)


def test_iter_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(InputError) as e:
        list(iter_jsonl(path, tolerate_torn_tail=True))  # a complete bad line is an error even when tolerant
    assert str(path) in str(e.value) and "line 2" in str(e.value)
    path.write_text('{"a": 1}\n{"a": ')
    with pytest.raises(InputError):
        list(iter_jsonl(path))
    assert [r for _, r in iter_jsonl(path, tolerate_torn_tail=True)] == [{"a": 1}]


def test_atomic_write_and_append(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600
    append_jsonl(tmp_path / "b.jsonl", [{"i": 1}, {"i": 2}])
    (tmp_path / "b.jsonl").write_text((tmp_path / "b.jsonl").read_text() + '{"i": 3')
    repair_jsonl(tmp_path / "b.jsonl")
    assert [r["i"] for _, r in iter_jsonl(tmp_path / "b.jsonl")] == [1, 2]
    assert stable_hash({"b": 1, "a": 2}) == stable_hash({"a": 2, "b": 1})


@dataclasses.dataclass
class _Inner:
    lr: float = 1e-4
    steps: int = 10
    use_bf16: bool = False


@dataclasses.dataclass
class _Outer:
    name: str = "x"
    trainer: _Inner = dataclasses.field(default_factory=_Inner)
    tags: list = dataclasses.field(default_factory=list)


def test_config_overrides_and_unknown_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: demo\ntrainer:\n  lr: 1e-5\n")
    cfg = load_config(_Outer, recipe, ["trainer.steps=3", "trainer.use_bf16=true", "tags=[a,b]"])
    assert cfg.name == "demo" and cfg.trainer.lr == 1e-5 and cfg.trainer.steps == 3
    assert cfg.trainer.use_bf16 is True and cfg.tags == ["a", "b"]
    with pytest.raises(InputError) as e:
        load_config(_Outer, recipe, ["trainer.lr_typo=1"])
    assert "trainer.lr_typo" in str(e.value)
    with pytest.raises(InputError):
        from_dict(_Outer, {"trainer": {"steps": "many"}})
    with pytest.raises(InputError):
        apply_overrides({}, ["no_equals_sign"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(InputError) as e:
        load_config(_Outer, bad)
    assert str(bad) in str(e.value)
