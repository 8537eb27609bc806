"""Issue 17: model and dataset cards round-trip through huggingface_hub, `rag-dpo push` sends the right files to a
fake hub on 127.0.0.1 and fails with one line without a token or a reachable hub, the wandb dashboard spec builds
offline and every name it reads is one the trainers / eval / compare really log, two bad inputs give one line and
exit 2, and `make eval` picks the latest trained run. Tiny models only (one DPO step, one PPO round)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from rag_dpo.errors import InputError

REPO = Path(__file__).resolve().parent.parent


# ---- a trained folder and a run folder ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_out(tmp_path_factory, tiny_policy_dir, tokenizer):
    """One DPO step on the tiny model through the real trainer (finish_training writes the card)."""
    from datasets import Dataset

    from rag_dpo.train.dpo import DPOSettings, train_dpo
    from test_train_sft_dpo import _pairs
    cfg = DPOSettings(max_steps=1, per_device_train_batch_size=1, logging_steps=1, save_steps=100,
                      precision="fp32", wandb=False, precompute_ref_log_probs=False)
    out = tmp_path_factory.mktemp("dpo") / "trained"
    return train_dpo(cfg, Dataset.from_list(_pairs(tokenizer, outcome=True)[:1]), out, model=str(tiny_policy_dir))


def _run_folder(tmp_path: Path) -> Path:
    """A run folder as `rag-dpo train` leaves it: recipe, data hashes, results of three policies, and a trained
    adapter (config only: the card reads files, not weights) started from a warm start of the bundled model."""
    run = tmp_path / "run"
    ws, tr = run / "warm_start", run / "trained"
    for d in (ws, tr):
        d.mkdir(parents=True)
    data = "data/hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl"
    recipe = {"name": "dpo_step", "method": "dpo", "model": "smollm2",
              "data": {"path": data, "eval_split": "test", "fractions": "0.55,0.1,0.35"}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "data_hashes.json").write_text(json.dumps({data: "ab" * 32, "rollouts/labels.jsonl": "cd" * 32}))
    results = {name: {"agent": {"em": em, "f1": em + 0.05, "support_recall": 0.7, "parse_error_rate": 0.0,
                                "steps": 2.9, "n": 20}} for name, em in
               (("base", 0.0), ("warm_start", 0.15), ("trained", 0.2))}
    (run / "results.json").write_text(json.dumps(results))
    (run / "results.md").write_text("# t\n\n| policy |\n|---|\n\n**DPO-trained policy vs the warm start**: ΔEM +0.05.\n")
    (ws / "warm_start.json").write_text(json.dumps({"model": "smollm2", "questions": 290}))
    (ws / "train_done.json").write_text(json.dumps({"global_step": 73, "loss": 0.5}))
    (tr / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(ws.resolve())}))
    (tr / "train_done.json").write_text(json.dumps({"global_step": 8, "loss": 0.61,
                                                    "health": {"flags": ["likelihood displacement: x"]}}))
    (tr / "training_manifest.json").write_text(json.dumps({
        "question_ids": ["q1", "q2", "q3"], "data_files": [{"path": data, "sha256": "ab" * 32}],
        "info": {"method": "dpo", "recipe": "dpo_step"}}))
    return run


def test_model_card_metadata_round_trips_and_holds_recipe_hashes_and_eval_table(tmp_path):
    from huggingface_hub import ModelCard

    from rag_dpo.cards import BUNDLED_HUB_ID, write_model_card
    run = _run_folder(tmp_path)
    path = write_model_card(run / "trained", run_dir=run, name="trained")
    card = ModelCard.load(path)
    meta = card.data
    assert meta.base_model == BUNDLED_HUB_ID and meta.base_model_relation == "adapter"
    assert meta.library_name == "peft" and meta.license == "apache-2.0"
    assert meta.datasets == ["hotpotqa/hotpot_qa"] and {"rag_dpo", "dpo", "lora"} <= set(meta.tags)
    ems = {r.metric_name: r.metric_value for r in meta.eval_results}
    assert ems["EM (agent)"] == 0.2 and ems["F1 (agent)"] == 0.25 and meta.eval_results[0].dataset_split == "test"
    # parsed back equal: the YAML written is the metadata we built
    again = ModelCard(str(card))
    assert again.data.to_dict() == meta.to_dict() and again.data.eval_results == meta.eval_results
    text = card.text
    assert "Training questions:** 3" in text and "ab" * 32 in text and "method: dpo" in text
    assert "| **trained** (this model) | agent | 0.200" in text and "| warm_start | agent | 0.150" in text
    assert "| base | agent | 0.000" in text and "ΔEM +0.05" in text
    assert "likelihood displacement" in text and "Intended use and limits" in text
    assert "smollm2 → warm_start → trained" in text


def test_trainer_writes_a_card_and_the_warm_start_card_names_its_questions(dpo_out, tmp_path):
    from huggingface_hub import ModelCard

    from rag_dpo.cards import write_model_card
    card = ModelCard.load(dpo_out / "README.md")
    assert card.data.library_name == "peft" and "dpo" in card.data.tags
    assert card.data.base_model is None            # a local tiny model is no hub id: named in the text instead
    assert "Optimiser steps:** 1" in card.text and "Not evaluated yet" in card.text
    ws = _run_folder(tmp_path) / "warm_start"
    meta = ModelCard.load(write_model_card(ws)).data
    assert meta.base_model_relation == "finetune" and meta.library_name == "transformers"
    assert "oracle chains of 290 train questions" in ModelCard.load(ws / "README.md").text


def test_dataset_card_in_every_pairs_folder(tmp_path, tokenizer):
    from huggingface_hub import DatasetCard

    from rag_dpo.pairs.builders import PairConfig, build_dataset
    from rag_dpo.records import write_chains
    from test_pairs import labelled_tree
    labels = tmp_path / "labels.jsonl"
    write_chains(labels, [labelled_tree("q1"), labelled_tree("q2")])
    out = build_dataset(labels, "step", tmp_path / "step", tokenizer, PairConfig())
    card = DatasetCard.load(out / "README.md")
    assert card.data.size_categories == ["n<1K"] and {"dpo", "step", "rag_dpo"} <= set(card.data.tags)
    assert DatasetCard(str(card)).data.to_dict() == card.data.to_dict()
    for line in ("| kind | step |", "| annotator (step labels) | manual |", "| pairing rule | best-vs-worst |",
                 "| rows | 4 |", "| questions (input / with rows) | 2 / 2 |", "| annotation_rollouts | 24 |"):
        assert line in card.text, line
    sft = build_dataset(labels, "sft", tmp_path / "sft", tokenizer, PairConfig(level="chain"))
    assert "whole right paths" in DatasetCard.load(sft / "README.md").text


# ---- push against a fake hub -------------------------------------------------------------------------------

class FakeHub:
    """Answers the four calls `HfApi.create_repo` + `upload_folder` make, with every file sent inline."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None]] = []
        self.created: list[dict] = []
        self.files: dict[str, bytes] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, self.headers.get("authorization")))
                if self.path == "/api/repos/create":
                    req = json.loads(raw)
                    hub.created.append(req)
                    kind = "datasets/" if req.get("type") == "dataset" else ""
                    return self._send({"url": f"{hub.url}/{kind}{req['organization']}/{req['name']}"})
                if self.path == "/api/validate-yaml":
                    return self._send({"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    return self._send({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                 for f in json.loads(raw)["files"]]})
                if "/commit/" in self.path:
                    for line in raw.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = self.path.split("/commit/")[0].removeprefix("/api/")
                    return self._send({"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
                self._send({"error": "not faked"}, 404)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield hub
    hub.server.shutdown()


def test_push_uploads_adapter_and_card_but_not_checkpoints(dpo_out, fake_hub):
    from rag_dpo.hub import push
    (dpo_out / "checkpoints" / "checkpoint-1").mkdir(parents=True, exist_ok=True)
    (dpo_out / "checkpoints" / "checkpoint-1" / "optimizer.pt").write_bytes(b"x")
    (dpo_out / "dpo" / "checkpoints").mkdir(parents=True, exist_ok=True)     # a score stage's DPO stage
    (dpo_out / "dpo" / "adapter_model.safetensors").write_bytes(b"x")
    (dpo_out / "dpo" / "checkpoints" / "optimizer.pt").write_bytes(b"x")
    res = push(dpo_out, "me/tiny-dpo", private=True, endpoint=fake_hub.url)
    assert fake_hub.created == [{"name": "tiny-dpo", "organization": "me", "visibility": "private", "type": "model"}]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "train_log.json"} <= set(fake_hub.files)
    assert not any(p.startswith(("checkpoints", "dpo/")) for p in fake_hub.files)
    assert fake_hub.files["adapter_model.safetensors"] == (dpo_out / "adapter_model.safetensors").read_bytes()
    assert all(auth == "Bearer hf_test_token" for _, _, auth in fake_hub.requests)
    assert res["kind"] == "adapter" and "/api/models/me/tiny-dpo/commit/main" in [p for _, p, _ in fake_hub.requests]


def test_push_merged_sends_full_weights_and_a_dataset_goes_to_a_dataset_repo(dpo_out, fake_hub, tmp_path, tokenizer):
    from rag_dpo.hub import push
    res = push(dpo_out, "me/tiny-merged", merged=True, endpoint=fake_hub.url)
    assert res["kind"] == "merged" and "model.safetensors" in fake_hub.files and "config.json" in fake_hub.files
    assert "adapter_config.json" not in fake_hub.files
    assert b"library_name: transformers" in fake_hub.files["README.md"]
    from rag_dpo.pairs.builders import PairConfig, build_dataset
    from rag_dpo.records import write_chains
    from test_pairs import labelled_tree
    write_chains(tmp_path / "l.jsonl", [labelled_tree("q1")])
    ds = build_dataset(tmp_path / "l.jsonl", "step", tmp_path / "step", tokenizer, PairConfig())
    fake_hub.files.clear()
    assert push(ds, "me/pairs", endpoint=fake_hub.url)["repo_type"] == "dataset"
    assert fake_hub.created[-1]["type"] == "dataset" and "/api/datasets/me/pairs/commit/main" in \
        [p for _, p, _ in fake_hub.requests]
    assert {"README.md", "budget.json", "dataset_info.json", "state.json"} <= set(fake_hub.files)


def _cli(*args, env=None):
    p = subprocess.run([sys.executable, "-m", "rag_dpo.cli", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, cwd=REPO)
    return p.returncode, p.stderr.strip()


def test_push_without_token_or_hub_is_one_line_and_exit_2(dpo_out, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
    s.close()
    no_token = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    rc, err = _cli("push", str(dpo_out), "--repo-id", "me/x", env=no_token)
    assert rc == 2 and err.startswith("error:") and "no Hugging Face token" in err and len(err.splitlines()) == 1
    rc, err = _cli("push", str(dpo_out), "--repo-id", "me/x",
                   env={"HF_TOKEN": "hf_x", "HF_ENDPOINT": f"http://127.0.0.1:{closed}", "HF_HUB_OFFLINE": "0"})
    assert rc == 2 and f"127.0.0.1:{closed}" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    rc, err = _cli("push", str(tmp_path / "nope"), "--repo-id", "me/x")
    assert rc == 2 and "no such folder" in err


# ---- dashboard ---------------------------------------------------------------------------------------------

def test_dashboard_spec_builds_offline_and_says_how_to_apply_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb_workspaces")
    from typer.testing import CliRunner

    from rag_dpo.cli import app
    from rag_dpo.dashboard import expected_metrics
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "dash.json"
    res = CliRunner().invoke(app, ["dashboard", "--project", "p", "--group", "cmp", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "wandb sync" in res.output and "--save" in res.output
    saved = json.loads(out.read_text())
    spec = json.dumps(saved["spec"])
    for names in expected_metrics().values():
        for name in names:
            assert json.dumps(name) in spec, name
    assert '"value": "cmp"' in spec                                    # only the compare's wandb group
    with pytest.raises(InputError, match="offline"):
        from rag_dpo.dashboard import dashboard
        dashboard("p", entity="e", out=tmp_path / "x.json", save=True)


class _Capture:
    """Stands in for rag_dpo.tracking: records every logged key, table and image name."""

    def __init__(self, monkeypatch):
        from rag_dpo import tracking
        self.keys: set[str] = set()
        monkeypatch.setattr(tracking, "init_run", lambda *a, **k: self)
        monkeypatch.setattr(tracking, "finish", lambda run: None)
        monkeypatch.setattr(tracking, "log", lambda run, data, step=None: self.keys.update(data) if run else None)
        monkeypatch.setattr(tracking, "log_table", lambda run, key, cols, rows: self.keys.add(key) if run else None)
        monkeypatch.setattr(tracking, "log_image", lambda run, key, path: self.keys.add(key) if run else None)


def test_every_run_logs_the_names_the_dashboard_reads(dpo_out, tmp_path, monkeypatch, tiny_policy_dir):
    import inspect

    from transformers.integrations import integration_utils as hf

    from rag_dpo.dashboard import expected_metrics
    want = expected_metrics()
    # DPO / SFT: what the trainer logged, as HF's wandb callback names it (it adds train/global_step itself)
    history = json.loads((dpo_out / "train_log.json").read_text())
    logged = {k for row in history for k in hf.rewrite_logs(row)} | {"train/global_step"}
    assert '"train/global_step"' in inspect.getsource(hf.WandbCallback)
    assert want["dpo"] | want["hf-trainer"] <= logged, (want["dpo"] | want["hf-trainer"]) - logged
    # PPO: one round on the tiny model
    import rag_dpo.train.ppo as ppo
    from conftest import ToyRetriever
    from rag_dpo.records import Corpus, Passage, Question
    seen: set[str] = set()
    monkeypatch.setattr(ppo, "_wandb_log", lambda data: seen.update(data))
    corpus = Corpus([Passage(f"p{i}", f"Title {i}", f"Passage {i}.") for i in range(4)])
    qs = [Question(f"q{i}", f"What is thing {i}?", [f"thing {i}"], [f"p{i}"]) for i in range(2)]
    cfg = ppo.PPOSettings(reward="outcome", iterations=1, questions_per_iteration=2, group_size=2, ppo_epochs=1,
                          minibatch_size=4, precision="fp32", wandb=False)
    ppo.train_ppo(cfg, ppo.PPOInputs(qs, corpus, ToyRetriever(corpus), {"max_new_tokens": 4, "max_steps": 1,
                                                                         "batch_size": 4}),
                  tmp_path / "ppo", str(tiny_policy_dir))
    assert want["ppo"] <= seen, want["ppo"] - seen
    # compare: arm runs (eval means + the warm start's on the same questions) and the summary run
    cap = _Capture(monkeypatch)
    from rag_dpo.pipeline.compare import run_compare
    from test_compare import FakeBackend, _cfg
    run_compare(_cfg(tmp_path, seeds=[0], ablation_seeds=[], curve_seeds=[]), FakeBackend(), progress=False)
    assert want["compare"] | want["compare-summary"] <= cap.keys, (want["compare"] | want["compare-summary"]) - cap.keys
    # recipe runs (pipeline eval step) and rag-dpo eval: metrics and the chains tables
    from rag_dpo.eval.evaluate import _log_wandb
    from rag_dpo.pipeline.run import _log_results
    from rag_dpo.records import Chain, write_chains
    chains = [Chain(question_id="q1", question="?", gold_answers=["a"], method="agent")]
    for name in ("trained", "warm_start"):
        write_chains(tmp_path / "run" / "eval" / name / "chains.jsonl", chains)
    import wandb
    monkeypatch.setattr(wandb, "run", cap, raising=False)
    table = {n: {"agent": {"em": 0.1, "f1": 0.2, "support_recall": 0.3}} for n in ("trained", "warm_start")}
    _log_results(table, tmp_path / "run")
    _log_wandb({}, {"agent": {k: 0.0 for k in ("em", "f1", "cover_em", "support_recall", "steps",
                                               "parse_error_rate", "n", "seconds")}},
               {"agent": chains}, tmp_path / "p.png", tmp_path)
    assert want["pipeline"] | want["eval"] <= cap.keys, (want["pipeline"] | want["eval"]) - cap.keys


# ---- bad input -------------------------------------------------------------------------------------------------

def test_non_utf8_data_file_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"id": "1", "question": "Caf\u00e9?"}\n'.encode("latin-1"))
    rc, err = _cli("eval", "--data", str(bad), "--limit", "1", "--out", str(tmp_path / "ev"))
    assert rc == 2 and err == f"error: {bad}, line 1: not UTF-8 text (byte 0xe9 at column 29); save the file as UTF-8"
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    rc, err = _cli("train", str(recipe))
    assert rc == 2 and str(recipe) in err and "not UTF-8" in err and len(err.splitlines()) == 1


def test_missing_policy_folder_says_no_such_folder(tmp_path):
    from rag_dpo.agent.policy import resolve_policy_path
    for spec in ("/no/such/folder", "./nope", "runs/x/trained"):
        with pytest.raises(InputError, match="no such folder"):
            resolve_policy_path(spec)
    rc, err = _cli("eval", "--data", str(REPO / "data/hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl"),
                   "--policy", "/no/such/folder", "--limit", "1", "--out", str(tmp_path / "ev"))
    assert rc == 2 and err == "error: /no/such/folder, field 'policy': no such folder"


# ---- make eval picks what was just trained ---------------------------------------------------------------------

def _fake_run(root: Path, name: str, method: str, mtime: float, warm: bool = True) -> Path:
    run = root / name
    (run / "trained").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "name": name, "method": method, "seed": 3, "data": {"path": "data/x.jsonl", "fractions": "0.55,0.1,0.35",
                                                            "eval_split": "test"},
        "retrieval": {"name": "bm25", "k": 2}, "rollout": {"max_steps": 3, "max_new_tokens": 48}}))
    done = run / "trained" / "train_done.json"
    done.write_text("{}")
    os.utime(done, (mtime, mtime))
    if warm:
        (run / "warm_start").mkdir()
        (run / "warm_start" / "train_done.json").write_text("{}")
    return run


def test_make_eval_selects_the_latest_dpo_run_else_the_base_model(tmp_path, monkeypatch):
    from rag_dpo.eval import latest
    runs = tmp_path / "runs"
    assert latest.select_policies(runs).policies == {"base": "smollm2"}
    _fake_run(runs, "old_dpo", "dpo", 1000)
    new = _fake_run(runs, "dpo_step", "dpo", 2000)
    _fake_run(runs, "sft", "sft", 3000)                     # newer, but not a DPO run
    (runs / "half_done").mkdir()                            # no recipe, no trained policy: ignored
    sel = latest.select_policies(runs)
    assert sel.run_dir == new and sel.policies == {"trained": str(new / "trained"),
                                                   "warm_start": str(new / "warm_start")}
    assert (sel.split, sel.fractions, sel.data) == ("test", "0.55,0.1,0.35", "data/x.jsonl")
    assert sel.rollout == {"max_steps": 3, "max_new_tokens": 48, "k": 2, "seed": 3}
    assert latest.select_policies(runs, method="sft").policies == {"trained": str(runs / "sft" / "trained"),
                                                                   "warm_start": str(runs / "sft" / "warm_start")}
    # evaluate_latest scores each selected policy on the run's held-out split and says which it scored
    calls = []
    monkeypatch.setattr("rag_dpo.eval.evaluate.evaluate", lambda data, **kw: calls.append((data, kw)) or {})
    sel, _ = latest.evaluate_latest(runs, out_dir=tmp_path / "ev")
    assert [kw["policy"] for _, kw in calls] == [str(new / "trained"), str(new / "warm_start")]
    assert all(kw["split"] == "test" and kw["fractions"] == "0.55,0.1,0.35" and kw["methods"] == "agent"
               for _, kw in calls)
    assert "scoring trained" in sel.describe() and "warm_start" in sel.describe()
    calls.clear()
    latest.evaluate_latest(tmp_path / "empty", out_dir=tmp_path / "ev")
    assert [kw["policy"] for _, kw in calls] == ["smollm2"] and calls[0][1]["split"] == "dev"
    assert calls[0][1]["methods"] == latest.BASE_METHODS
