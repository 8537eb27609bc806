"""The planner / synthesizer agent (agent.hierarchical): what each role sees, that the planner is the engine's
rollout, that its chains feed the existing annotators, pair builders and eval, and the synthesizer's answer pairs.

Scripted tests replace the engine's `generate_texts` with fixed replies (a random tiny model rarely writes a
parsable search), so the planner's thinking, queries and answer are known strings that must not reach the
synthesizer; the end-to-end tests run the tiny random model itself."""

from __future__ import annotations

import pytest

from conftest import HOTPOT_DEV
from rag_dpo.agent import hierarchical as hier
from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
from rag_dpo.records import ANSWER, INVALID, SEARCH, Chain, Corpus, Passage, Question, Step

CORPUS = Corpus([Passage(f"p{i}", f"Title{i}", f"Passage number {i} mentions fact{i}.") for i in range(6)])
QUESTIONS = [Question("a", "Who wrote Hamlet?", ["Shakespeare"], ["p1", "p2"]),
             Question("b", "Where is Paris?", ["France"], ["p3"])]

PLANNER_STEPS = ["<think>PLANSECRET first the author, subquestion SUBQ1</think>\n<search>zzqueryone</search>",
                 "<think>PLANSECRET2 enough evidence</think>\n<answer>PLANANSWER</answer>"]


class QueryRetriever:
    """p1, p2 for the first query, p2, p3 for any other (overlapping, to check de-duplication)."""
    name = "toy"

    def search(self, queries, k):
        return [[("p1", 1.0), ("p2", 0.5)][:k] if "one" in q else [("p2", 1.0), ("p3", 0.5)][:k] for q in queries]


def _engine(tiny, **kw):
    model, tok = tiny
    cfg = RolloutConfig(max_new_tokens=6, k=2, batch_size=4, max_steps=3, progress=False, **kw)
    return RolloutEngine(model, tok, QueryRetriever(), CORPUS, cfg, model_name="tiny")


def _script(engine, monkeypatch, planner_replies, synth_reply="Shakespeare</answer>"):
    """Planner calls get `planner_replies[step]` (step = observations in their context), synthesizer calls (the
    ones with an answer budget) `synth_reply`; every call's decoded contexts are recorded."""
    calls = []

    def fake(contexts, seeds, sample, max_new_tokens=None):
        texts = [engine.tokenizer.decode(c) for c in contexts]
        role = "planner" if max_new_tokens is None else "synthesizer"
        calls.append((role, texts))
        if role == "synthesizer":
            return [(synth_reply, 5) for _ in contexts]
        return [(planner_replies[min(t.count("\n</information>\n"), len(planner_replies) - 1)], 7) for t in texts]
    monkeypatch.setattr(engine, "generate_texts", fake)
    return calls


def test_synthesizer_sees_question_and_passages_only(tiny_model_and_tokenizer, monkeypatch):
    engine = _engine(tiny_model_and_tokenizer)
    calls = _script(engine, monkeypatch, PLANNER_STEPS)
    c = hier.hierarchical(engine, QUESTIONS[:1])[0]
    synth = [texts for role, texts in calls if role == "synthesizer"]
    assert len(synth) == 1 and len(synth[0]) == 1
    prompt = synth[0][0]
    assert "Who wrote Hamlet?" in prompt and hier.SYNTHESIZER_PROMPT in prompt
    assert prompt.endswith("<|im_start|>assistant\n<answer>")     # its turn starts with the answer tag
    assert "Passage number 1 mentions fact1." in prompt and "Passage number 2 mentions fact2." in prompt
    assert prompt.count("fact2") == 1                       # retrieved passages de-duplicated
    for planner_text in ("PLANSECRET", "SUBQ1", "zzqueryone", "PLANANSWER", "<search>", "<think>",
                         "<information>", "multi-hop questions by searching"):   # the planner's system prompt too
        assert planner_text not in prompt
    # the planner's contexts are the flat agent's prompt with its own steps
    assert all("multi-hop questions by searching" in t for role, texts in calls if role == "planner" for t in texts)
    assert c.meta["synthesizer_passages"] == ["p1", "p2"]


def test_chain_layout_planner_steps_then_synthesizer_answer(tiny_model_and_tokenizer, monkeypatch):
    engine = _engine(tiny_model_and_tokenizer)
    _script(engine, monkeypatch, PLANNER_STEPS)
    c = hier.hierarchical(engine, QUESTIONS[:1])[0]
    path = c.path()
    assert [s.action for s in path] == [SEARCH, ANSWER] and c.method == "agent-hier"
    assert path[0].text == PLANNER_STEPS[0] and path[0].retrieved_ids == ["p1", "p2"]
    assert path[-1].answer == "Shakespeare" and c.final_answer == "Shakespeare" and c.selected == path[-1].id
    assert path[-1].text == "<answer>Shakespeare</answer>" and path[-1].parse_error is None
    assert c.meta["roles"] == {"planner": [path[0].id], "synthesizer": [path[-1].id]}
    assert c.meta["planner_end"] == "answer" and c.meta["planner_answer"] == "PLANANSWER"
    # the planner's own chain comes back whole: its finish step in place, method agent
    pc = hier.planner_chain(c)
    assert [s.text for s in pc.path()] == PLANNER_STEPS and pc.final_answer == "PLANANSWER" and pc.method == "agent"
    assert len({s.id for s in c.steps} | {c.meta["planner_finish"]["id"]}) == 3   # ids never collide
    back = Chain.from_dict(c.to_dict())
    assert back.final_answer == "Shakespeare" and hier.planner_path(back)[-1].answer == "PLANANSWER"


@pytest.mark.parametrize("replies,end", [(["<think>x</think><search>zzqueryone</search>"], "max_steps"),
                                         (["<think>x</think><search>zzqueryone</search>", "no tags at all"],
                                          "invalid")])
def test_synthesizer_answers_when_planner_does_not_finish(tiny_model_and_tokenizer, monkeypatch, replies, end):
    engine = _engine(tiny_model_and_tokenizer)
    _script(engine, monkeypatch, replies)
    c = hier.hierarchical(engine, QUESTIONS[:1])[0]
    path = c.path()
    assert c.meta["planner_end"] == end and "planner_finish" not in c.meta
    assert path[-1].action == ANSWER and c.final_answer == "Shakespeare"
    assert len(path) == (4 if end == "max_steps" else 3) and path[-2].action == (SEARCH if end == "max_steps"
                                                                                  else INVALID)


def test_planner_steps_are_the_engines_rollout(tiny_model_and_tokenizer):
    """Unscripted tiny model: the hierarchical chain's planner path is exactly `engine.rollout`'s chain."""
    flat = _engine(tiny_model_and_tokenizer).rollout(QUESTIONS)
    chains = hier.hierarchical(_engine(tiny_model_and_tokenizer), QUESTIONS)
    for f, h in zip(flat, chains):
        planner = hier.planner_path(h)
        assert [(s.id, s.text, s.action, s.retrieved_ids) for s in planner] == \
            [(s.id, s.text, s.action, s.retrieved_ids) for s in f.path()]
        assert h.path()[-1].id == h.meta["roles"]["synthesizer"][0] and h.path()[-1].action in (ANSWER, INVALID)


def test_chains_feed_annotators_and_pair_builders(tiny_model_and_tokenizer, monkeypatch, tmp_path):
    from rag_dpo.annotate.annotators import build_annotator
    from rag_dpo.pairs.builders import PairConfig, build_rows, save_dataset
    from rag_dpo.records import read_chains, write_chains
    engine = _engine(tiny_model_and_tokenizer)
    _script(engine, monkeypatch, PLANNER_STEPS)
    path = tmp_path / "hier.jsonl"
    write_chains(path, hier.hierarchical(engine, QUESTIONS))
    chains = read_chains(path)
    for name in ("outcome", "evidence"):
        build_annotator(name).annotate(chains)
    a = chains[0]
    # evidence: the planner's search found supporting p1/p2; the synthesizer's right answer scores F1 1
    assert a.path()[0].labels["evidence"].value == 1.0 and a.path()[-1].labels["evidence"].value == 1.0
    assert a.path()[0].labels["outcome"].value == 1.0 and chains[1].path()[-1].labels["outcome"].value == 0.0
    tok = tiny_model_and_tokenizer[1]
    rows, _ = build_rows(chains, "sft", tok, PairConfig(level="chain"))
    assert [r["question_id"] for r in rows] == ["a"] and rows[0]["completion"].endswith("<answer>Shakespeare</answer>")
    # the planner's own chains (finish step restored) give step-annotation rows for the planner
    planner = [hier.planner_chain(c) for c in chains]
    build_annotator("evidence").annotate(planner)
    rows, _ = build_rows(planner, "stepwise", tok, PairConfig(annotator="evidence"))
    assert len(rows) == 2 and rows[0]["completions"][-1].endswith("<answer>PLANANSWER</answer>")
    save_dataset(rows, "stepwise", tmp_path / "stepwise", {})


def test_agent_hier_runs_through_evaluate(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    from rag_dpo.eval.evaluate import evaluate
    from rag_dpo.records import read_chains
    data = tmp_path / "hotpot3.jsonl"
    data.write_text("".join(HOTPOT_DEV.read_text().splitlines(keepends=True)[:3]))
    cfg = RolloutConfig(max_new_tokens=4, max_steps=2, batch_size=4, progress=False)
    kw = dict(policy="tiny", split="all", limit=2, rollout=cfg, model_and_tokenizer=tiny_model_and_tokenizer,
              use_wandb=False, answer_tokens=3)
    alone = evaluate(data, methods="agent-hier", out_dir=tmp_path / "alone", **kw)
    rolled = []
    real = RolloutEngine.rollout
    monkeypatch.setattr(RolloutEngine, "rollout", lambda self, qs, *a, **k: rolled.append(len(qs)) or
                        real(self, qs, *a, **k))
    # listed after agent-hier on purpose: agent runs first, and agent-hier synthesizes on its chains
    res = evaluate(data, methods="agent-hier,agent", out_dir=tmp_path / "ev", **kw)
    assert res["agent-hier"]["n"] == 2 and res["agent"]["n"] == 2
    assert rolled == [2]                     # the planner was rolled out once, for agent
    assert res["agent-hier"]["em"] == alone["agent-hier"]["em"] and res["agent-hier"]["f1"] == alone["agent-hier"]["f1"]
    one = {c.question_id: c.path()[-1].text for c in read_chains(tmp_path / "alone" / "chains.jsonl")}
    assert {c.question_id: c.path()[-1].text for c in read_chains(tmp_path / "ev" / "chains.jsonl")
            if c.method == "agent-hier"} == one
    chains = [c for c in read_chains(tmp_path / "ev" / "chains.jsonl") if c.method == "agent-hier"]
    assert len(chains) == 2
    flat = {c.question_id: c for c in read_chains(tmp_path / "ev" / "chains.jsonl") if c.method == "agent"}
    for c in chains:
        synth = c.path()[-1]
        assert c.meta["roles"]["synthesizer"] == [synth.id] and synth.generated_tokens <= 3
        assert [s.text for s in hier.planner_path(c)] == [s.text for s in flat[c.question_id].path()]


def _answer(sid, text):
    from rag_dpo.agent.baselines import answer_step
    return answer_step(sid, None, text, 3)


def test_synthesizer_pair_prefers_higher_f1():
    from rag_dpo.pairs.builders import _features
    chain = Chain("a", "Who wrote Hamlet?", gold_answers=["William Shakespeare"])
    answers = [_answer("synth:0", "<answer>Marlowe</answer>"),
               _answer("synth:1", "<answer>William Shakespeare</answer>"),
               _answer("synth:2", "<answer>Shakespeare</answer>"),
               _answer("synth:3", "<answer>Christopher Marlowe</answer>")]
    rows = hier.synthesizer_pair_rows(chain, "PROMPT", answers)
    assert len(rows) == 1
    r = rows[0]
    assert r["chosen"] == "<answer>William Shakespeare</answer>" and r["chosen_value"] == 1.0
    assert r["rejected"] == "<answer>Marlowe</answer>" and r["rejected_value"] == 0.0
    assert r["prompt"] == "PROMPT" and r["chosen_ends_turn"] and r["rejected_ends_turn"]
    assert set(r) == set(_features("step"))                      # the step-pair columns the DPO trainer reads
    # reversed order: still the higher F1 is chosen
    assert hier.synthesizer_pair_rows(chain, "P", answers[::-1])[0]["chosen"] == r["chosen"]
    # no pair among equal-F1 answers, nor between the same answer written twice, nor under the margin
    same = [_answer("s0", "<answer>Marlowe</answer>"), _answer("s1", "<answer>Kyd</answer>")]
    assert hier.synthesizer_pair_rows(chain, "P", same) == []
    dup = [_answer("s0", "<answer>William Shakespeare</answer>"), _answer("s1", "William Shakespeare.")]
    assert hier.synthesizer_pair_rows(chain, "P", dup) == []
    close = [_answer("s0", "<answer>William Shakespeare</answer>"),
             _answer("s1", "<answer>William Shakespeare the playwright of Stratford upon Avon</answer>")]
    assert hier.synthesizer_pair_rows(chain, "P", close, margin=0.9) == []


def test_synthesizer_pairs_from_planner_chains(tiny_model_and_tokenizer, monkeypatch, tmp_path):
    """Sampled answers come from the synthesizer prompt (several seeds per chain), the right one is chosen, and
    the rows save as a step-pair dataset."""
    from rag_dpo.pairs.builders import save_dataset
    engine = _engine(tiny_model_and_tokenizer)
    _script(engine, monkeypatch, PLANNER_STEPS)
    chains = [hier.planner_chain(c) for c in hier.hierarchical(engine, QUESTIONS[:1])]
    seen = []
    replies = iter(["Marlowe</answer>", "Shakespeare</answer>", "Kyd</answer>"])

    def fake(contexts, seeds, sample, max_new_tokens=None):
        seen.append((list(contexts), list(seeds), sample))
        return [(next(replies), 4) for _ in contexts]
    monkeypatch.setattr(engine, "generate_texts", fake)
    rows, spent = hier.synthesizer_pairs(engine, chains, n=3)
    (contexts, seeds, sample), = seen
    assert sample and len(contexts) == 3 and len(set(seeds)) == 3 and contexts[0] == contexts[1] == contexts[2]
    prompt = engine.tokenizer.decode(contexts[0])
    assert "fact1" in prompt and "PLANSECRET" not in prompt and "PLANANSWER" not in prompt
    assert len(rows) == 1 and rows[0]["chosen"] == "Shakespeare</answer>" and rows[0]["rejected"] == "Marlowe</answer>"
    assert rows[0]["prompt"] == prompt and prompt.endswith("<answer>")   # prompt + chosen = the synthesizer's turn
    assert spent["synthesizer_generated_tokens"] == 12 and spent["synthesizer_rows"] == 1
    save_dataset(rows, "step", tmp_path / "synth", {})


def test_variant_methods():
    from rag_dpo.errors import InputError
    assert hier.variant_methods(["rag", "agent"], "hierarchical") == ["rag", "agent-hier"]
    assert hier.variant_methods(["agent"], "flat") == ["agent"]
    assert hier.variant_methods(["agent", "agent-hier"], "hierarchical") == ["agent", "agent-hier"]
    with pytest.raises(InputError):
        hier.variant_methods(["agent"], "tree")


# ---- recipes and the pipeline -----------------------------------------------------------------------------------
def _hier_recipe(tiny_policy_dir, *extra):
    from pathlib import Path

    from rag_dpo.pipeline.recipe import load_recipe
    recipes = Path(__file__).resolve().parent.parent / "recipes"
    return load_recipe(recipes / "dpo_step_hier.yaml", [f"model={tiny_policy_dir}", "rollout.dtype=float32",
                                                        "eval.limit=2", *extra])


def test_recipe_variant_is_validated_and_flat_recipes_resolve_as_before(tiny_policy_dir):
    from pathlib import Path

    from rag_dpo.errors import InputError
    from rag_dpo.pipeline.recipe import load_recipe, resolved_dict
    r = _hier_recipe(tiny_policy_dir)
    assert r.agent.variant == "hierarchical" and resolved_dict(r)["agent"]["synthesizer_samples"] == 4
    flat = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "dpo_step.yaml")
    assert flat.agent.variant == "flat" and "agent" not in resolved_dict(flat)   # old run folders still resume
    with pytest.raises(InputError) as e:
        _hier_recipe(tiny_policy_dir, "agent.variant=tree")
    assert e.value.field == "agent.variant"
    with pytest.raises(InputError) as e:
        _hier_recipe(tiny_policy_dir, "pairs.kind=outcome")
    assert e.value.field == "pairs.kind"


def test_recipe_variant_reaches_eval(tiny_policy_dir, tmp_path, monkeypatch):
    import rag_dpo.eval.evaluate as ev
    from rag_dpo.pipeline.run import evaluate_policies
    seen = []

    def fake(*a, methods, **k):
        seen.append(list(methods))
        return {m: {"em": 0.0, "f1": 0.0, "n": 2} for m in methods}
    monkeypatch.setattr(ev, "evaluate", fake)
    table = evaluate_policies(_hier_recipe(tiny_policy_dir, "eval.methods=[agent]"), tmp_path,
                              {"warm_start": str(tiny_policy_dir)})
    assert seen == [["agent-hier"]] and set(table["warm_start"]) == {"agent-hier"}
    evaluate_policies(_hier_recipe(tiny_policy_dir), tmp_path / "both", {"warm_start": str(tiny_policy_dir)})
    assert seen[-1] == ["agent", "agent-hier"]


def test_pipeline_adds_synthesizer_pairs_to_the_step_pairs(tiny_policy_dir, tmp_path, monkeypatch):
    import json

    from datasets import load_from_disk

    import rag_dpo.agent.hierarchical as h
    from rag_dpo.pairs.builders import save_dataset
    from rag_dpo.pipeline.run import add_synthesizer_pairs
    from rag_dpo.records import write_chains
    recipe = _hier_recipe(tiny_policy_dir)
    step_row = {"prompt": "P", "chosen": "<think>a</think><search>x</search>", "rejected": "<answer>y</answer>",
                "chosen_info_spans": [], "rejected_info_spans": [], "chosen_ends_turn": False,
                "rejected_ends_turn": True, "question_id": "q1", "prefix_id": "", "chosen_id": "1",
                "rejected_id": "2", "chosen_value": 1.0, "rejected_value": 0.0, "chosen_action": "search",
                "rejected_action": "answer", "annotator": "evidence"}
    step_dir = save_dataset([step_row], "step", tmp_path / "pairs" / "step",
                            {"budget.json": {"rows": 1, "generated_tokens": 10}, "question_ids.json": ["q1", "q2"],
                             "config.json": {"kind": "step"}})
    labels = tmp_path / "labels.jsonl"
    write_chains(labels, [Chain("q2", "Who?", ["Ann"], steps=[Step("0", None, "<answer>Ann</answer>", ANSWER,
                                                                    answer="Ann")], selected="0")])
    calls = []

    def fake_pairs(engine, chains, n, margin):
        calls.append((len(chains), n, margin, engine.cfg.k))
        return [dict(step_row, question_id="q2", prefix_id="synthesizer", annotator="answer-f1")], \
            {"synthesizer_generated_tokens": 7, "synthesizer_rows": 1}
    monkeypatch.setattr(h, "synthesizer_pairs", fake_pairs)
    out = add_synthesizer_pairs(recipe, tmp_path, labels, str(tiny_policy_dir), step_dir)
    assert calls == [(1, 4, 0.1, 3)] and out.name == "step+synthesizer"
    ds = load_from_disk(str(out))
    assert [r["prefix_id"] for r in ds] == ["", "synthesizer"]
    budget = json.loads((out / "budget.json").read_text())
    assert budget["rows"] == 2 and budget["step_rows"] == 1 and budget["generated_tokens"] == 17
    assert json.loads((out / "question_ids.json").read_text()) == ["q1", "q2"]
    # resume: a finished dataset is not rebuilt
    monkeypatch.setattr(h, "synthesizer_pairs", lambda *a, **k: pytest.fail("rebuilt"))
    assert add_synthesizer_pairs(recipe, tmp_path, labels, str(tiny_policy_dir), step_dir) == out


def test_synthesize_reuses_planner_chains_and_protocol_prompt_hides_planner(tiny_model_and_tokenizer, monkeypatch):
    """`synthesize` on the flat agent's chains: the same planner steps, a new synthesizer answer; the `protocol`
    prompt (the agent's own prompt + one <information> block) still holds no planner text."""
    engine = _engine(tiny_model_and_tokenizer)
    calls = _script(engine, monkeypatch, PLANNER_STEPS, synth_reply="Shakespeare</answer>")
    flat = engine.rollout(QUESTIONS[:1])
    out = hier.synthesize(engine, flat, hier.SynthesizerConfig(prompt="protocol", answer_tokens=5))[0]
    assert flat[0].method == "agent" and flat[0].final_answer == "PLANANSWER"      # the input is left as it was
    assert out.final_answer == "Shakespeare" and hier.planner_path(out)[-1].text == PLANNER_STEPS[1]
    assert out.meta["synthesizer"]["prompt"] == "protocol"
    prompt = [texts for role, texts in calls if role == "synthesizer"][0][0]
    assert "multi-hop questions by searching" in prompt and "Question: Who wrote Hamlet?" in prompt
    assert prompt.count("<information>") == 2 and "fact1" in prompt and prompt.endswith("</information>\n<answer>")
    for planner_text in ("PLANSECRET", "SUBQ1", "zzqueryone", "PLANANSWER", "<think>I"):
        assert planner_text not in prompt
    from rag_dpo.errors import InputError
    with pytest.raises(InputError):
        hier.synthesize(engine, flat, hier.SynthesizerConfig(prompt="free"))
