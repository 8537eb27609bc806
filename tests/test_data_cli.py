"""`rag-dpo data`: the summary (table and --json) and bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rag_dpo.cli import app
from rag_dpo.paths import DATA_DIR, DEFAULT_DATA


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rag_dpo.cli", *args], capture_output=True, text=True, timeout=120)


def test_data_json_summary():
    result = CliRunner().invoke(app, ["data", str(DEFAULT_DATA), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "ircot" and info["questions"] == 500 and info["answerable"] == 500
    assert info["corpus"]["passages"] == 4858
    assert info["supporting_ids"] == {"total": 1000, "resolved": 1000}
    assert info["splits"] == {"train": 370, "dev": 65, "test": 65} and info["hops"] == {"2": 500}


def test_data_table_with_corpus_and_fractions():
    result = CliRunner().invoke(app, ["data", str(DATA_DIR / "musique/hipporag_musique_train_100.json"),
                                      "--corpus", str(DATA_DIR / "musique/hipporag_musique_train_100_corpus.json"),
                                      "--fractions", "0.8,0.1,0.1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "1890 passages" in out and "237 / 237" in out and "3hop1: 24" in out and "(0.8)" in out


def test_data_musique_full_counts_unanswerable():
    result = CliRunner().invoke(app, ["data", str(DATA_DIR / "musique/cas_musique_full_20.json"), "--json"])
    info = json.loads(result.stdout)
    assert (info["questions"], info["answerable"], info["unanswerable"]) == (20, 11, 9)


@pytest.mark.parametrize("content,name,extra,expect", [
    ('{"_id": "q"}\n{oops\n', "bad.jsonl", [], "line 2"),
    ('[{"_id": "q", "answer": "a", "context": [], "supporting_facts": [], "question": ""}]', "x.json", [],
     "field 'question'"),
    ('{"_id": "q", "question": "Q?", "answer": "A", "context": [["P", ["p."]]], "supporting_facts": [["Z", 0]]}\n',
     "x.jsonl", [], "field 'supporting_facts'"),
    ('{"_id": "q", "question": "Q?", "answer": "A", "context": [["P", ["p."]]], "supporting_facts": [["P", 0]]}\n',
     "x.jsonl", ["--format", "nope"], "unknown format"),
    ('{"_id": "q", "question": "Q?", "answer": "A", "context": [["P", ["p."]]], "supporting_facts": [["P", 0]]}\n',
     "x.jsonl", ["--corpus", "{empty}"], "corpus is empty"),
])
def test_bad_input_exit_code_2(tmp_path, content, name, extra, expect):
    f = tmp_path / name
    f.write_text(content)
    (tmp_path / "empty.jsonl").write_text("")
    extra = [a.replace("{empty}", str(tmp_path / "empty.jsonl")) for a in extra]
    proc = run_cli("data", str(f), *extra)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: ") and expect in proc.stderr


def test_missing_file_exit_code_2(tmp_path):
    proc = run_cli("data", str(tmp_path / "nothing.jsonl"))
    assert proc.returncode == 2 and "file not found" in proc.stderr and "Traceback" not in proc.stderr
