"""The judge annotator against a local fake OpenAI-compatible server (127.0.0.1, a thread, bounded requests), and
the local HF judge on the tiny model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rag_dpo.annotate.annotators import AnnotatorConfig, JudgeConfig
from rag_dpo.annotate.judge import HFJudge, HTTPJudge, JudgeAnnotator, judge_prompt, parse_judgement
from rag_dpo.errors import InputError
from rag_dpo.records import ANSWER, SEARCH, Chain, Step


def tree() -> Chain:
    c = Chain(question_id="q", question="Who directed Jaws?", gold_answers=["Steven Spielberg"],
              supporting_ids=["p1"])
    c.add_step(Step(id="0", parent=None, text="<think>a</think>\n<search>Jaws film</search>", action=SEARCH,
                    query="Jaws film", retrieved_ids=["p1"], observation="\n<information>\n[1] Jaws\n</information>\n"))
    c.add_step(Step(id="1", parent=None, text="<think>b</think>\n<search>sharks</search>", action=SEARCH,
                    query="sharks", retrieved_ids=["p9"], observation="\n<information>\n[1] Shark\n</information>\n"))
    c.add_step(Step(id="2", parent=None, text="<think>c</think>\n<answer>Bob</answer>", action=ANSWER, answer="Bob"))
    c.add_step(Step(id="3", parent="0", text="<think>d</think>\n<answer>Steven Spielberg</answer>", action=ANSWER,
                    answer="Steven Spielberg"))
    c.selected = "3"
    return c


class FakeServer:
    """Answers chat completions with scripted replies; records requests; stops after `limit` requests."""

    def __init__(self, replies, status=200, limit=10):
        self.replies, self.requests, self.status = list(replies), [], status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                prompt = body["messages"][0]["content"]
                reply = outer.replies.pop(0) if outer.replies else "1"
                if callable(reply):
                    reply = reply(prompt)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}],
                                   "usage": {"completion_tokens": 3}}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=lambda: [self.server.handle_request() for _ in range(limit)],
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.server_close()


def by_prompt(prompt: str) -> str:
    return "2, 1, 3" if "Candidate next steps" in prompt else "yes"


def test_http_judge_ranks_candidates(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sekrit")
    with FakeServer([by_prompt, by_prompt], limit=2) as srv:
        cfg = AnnotatorConfig(judge=JudgeConfig(url=srv.url, model="fake", api_key_env="FAKE_JUDGE_KEY"))
        ann = JudgeAnnotator(HTTPJudge(cfg.judge), cfg)
        c = ann.annotate([tree()])[0]
    v = {s.id: s.labels["judge"].value for s in c.steps}
    assert v == {"1": 1.0, "0": 0.5, "2": 0.0, "3": 1.0}      # ranking 2,1,3 -> candidate ids 1 > 0 > 2
    assert [s.labels["judge"].good for s in c.steps] == [True, True, False, True]
    assert len(srv.requests) == 2
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sekrit" for r in srv.requests)
    assert c.step("0").labels["judge"].cost["judge_calls"] == pytest.approx(1 / 3)
    assert sum(s.labels["judge"].cost["judge_calls"] for s in c.steps) == pytest.approx(2.0)


def test_http_judge_key_env_missing_and_refusal(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(InputError, match="NO_SUCH_KEY_VAR"):
        HTTPJudge(JudgeConfig(url="http://127.0.0.1:9", api_key_env="NO_SUCH_KEY_VAR"))
    with FakeServer(["1"], status=401, limit=1) as srv:
        judge = HTTPJudge(JudgeConfig(url=srv.url, max_retries=0))
        with pytest.raises(InputError, match="HTTP 401"):
            judge.complete(["hi"])


def test_unparseable_reply_gives_no_preference():
    class Mumbler:
        def complete(self, prompts):
            return [("I cannot decide", 4)] * len(prompts)

    ann = JudgeAnnotator(Mumbler())
    c = ann.annotate([tree()])[0]
    assert {s.labels["judge"].value for s in c.steps if s.parent is None} == {0.5}
    assert ann.parse_failures == 2     # the 3-candidate ranking and the single-candidate yes/no both failed
    assert "parse_error" in c.step("0").labels["judge"].info


def test_parse_judgement_and_prompt():
    assert parse_judgement("3,1", 3) == [0.5, 0.0, 1.0]       # unranked candidate 2 gets 0
    assert parse_judgement("Ranking: [2] > [1]", 2) == [0.0, 1.0]
    assert parse_judgement("No.", 1) == [0.0]
    assert parse_judgement("", 2) is None
    c = tree()
    p = judge_prompt(c.question, [c.step("0")], [c.step("3")])
    assert "Jaws film" in p and "yes or no" in p


def test_hf_judge_runs_on_tiny_model(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    judge = HFJudge(JudgeConfig(max_new_tokens=4, batch_size=2), model=model, tokenizer=tok)
    out = judge.complete(["rank these", "another prompt that is longer than the first"])
    assert len(out) == 2 and all(isinstance(t, str) and 0 < n <= 4 for t, n in out)
    ann = JudgeAnnotator(judge)
    c = ann.annotate([tree()])[0]
    assert all("judge" in s.labels and 0.0 <= s.labels["judge"].value <= 1.0 for s in c.steps)
