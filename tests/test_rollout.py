"""The batched rollout engine: real generate on a tiny model (sampling seeded per row), and a scripted backend
for the multi-step logic (searches, observations, siblings, continuations) a random model never produces."""

from __future__ import annotations

import pytest
from conftest import ToyRetriever

from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
from rag_dpo.records import ANSWER, INVALID, SEARCH, Corpus, Passage, Question, read_chains


class ScriptedBackend:
    """Searches until two observations are in the context, then answers; the seed picks among variants."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.calls = []

    def generate(self, contexts, seeds, sample, cfg):
        self.calls.append(len(contexts))
        out = []
        for ids, seed in zip(contexts, seeds):
            n_obs = self.tok.decode(ids).count("<information>\n")   # the system prompt names the tag too
            v = seed % 3 if sample else 0
            text = (f"<think>step {n_obs}</think>\n<search>query {n_obs} v{v}</search>" if n_obs < 2
                    else f"<think>done</think>\n<answer>answer v{v}</answer>")
            out.append((text, 7))
        return out


@pytest.fixture()
def corpus():
    return Corpus([Passage(f"p{i}", f"Title {i}", f"Passage number {i} says something.") for i in range(6)])


@pytest.fixture()
def questions():
    return [Question(f"q{i}", f"What is thing {i}?", [f"thing {i}"], [f"p{i}"]) for i in range(4)]


def _engine(tiny_model_and_tokenizer, corpus, **kw):
    model, tok = tiny_model_and_tokenizer
    cfg = RolloutConfig(**{"max_new_tokens": 6, "max_steps": 3, "batch_size": 2, "decode_rows": 2, "do_sample": True, "progress": False,
                           **kw})
    return RolloutEngine(model, tok, ToyRetriever(corpus), corpus, cfg, model_name="tiny")


def test_generate_rollout_records_invalid_steps_and_spans(tiny_model_and_tokenizer, corpus, questions):
    eng = _engine(tiny_model_and_tokenizer, corpus)
    chains = eng.rollout(questions[:3])
    assert [c.question_id for c in chains] == ["q0", "q1", "q2"]
    for c in chains:
        s = c.steps[0]
        assert s.action == INVALID and s.parse_error      # a random model does not follow the protocol
        assert len(c.steps) == 1 and c.selected == s.id     # the chain ends at the invalid step
        assert 0 < s.generated_tokens <= 6 and s.policy_span[1] > s.policy_span[0]
        assert c.model == "tiny" and c.retriever == "toy" and c.sampling["do_sample"] is True


def test_sampling_does_not_depend_on_batch_composition(tiny_model_and_tokenizer, corpus, questions):
    a = _engine(tiny_model_and_tokenizer, corpus, batch_size=1).rollout(questions[:3])
    b = _engine(tiny_model_and_tokenizer, corpus, batch_size=3).rollout(questions[:3])
    assert [c.to_dict() for c in a] == [c.to_dict() for c in b]
    assert len({c.steps[0].text for c in a}) == 3
    c = _engine(tiny_model_and_tokenizer, corpus, seed=1).rollout(questions[:3])
    assert [x.steps[0].text for x in c] != [x.steps[0].text for x in a]


def test_several_samples_per_question_share_a_batch(tiny_model_and_tokenizer, corpus, questions):
    """PPO's group: sample 0 is the single-chain rollout, sample 1 draws its own tokens, all in one batch."""
    one = _engine(tiny_model_and_tokenizer, corpus, batch_size=4).rollout(questions[:2])
    eng = _engine(tiny_model_and_tokenizer, corpus, batch_size=4)
    two = eng.rollout(questions[:2], samples=2)
    assert [c.question_id for c in two] == ["q0", "q1", "q0", "q1"]
    assert [c.to_dict() for c in two[:2]] == [c.to_dict() for c in one]
    assert [c.steps[0].text for c in two[2:]] != [c.steps[0].text for c in two[:2]]
    apart = _engine(tiny_model_and_tokenizer, corpus, batch_size=1).rollout(questions[:2], samples=2)
    assert [c.to_dict() for c in apart] == [c.to_dict() for c in two]   # still independent of batching


def test_scripted_multistep_rollout_observes_and_masks(tiny_model_and_tokenizer, corpus, questions):
    from rag_dpo.agent.protocol import tokenize_path
    eng = _engine(tiny_model_and_tokenizer, corpus, do_sample=False)
    eng.backend = ScriptedBackend(eng.tokenizer)
    chains = eng.rollout(questions[:3])
    assert eng.backend.calls == [2, 2, 2, 1, 1, 1]        # batched across questions, chunks of batch_size
    c = chains[0]
    assert [s.action for s in c.path()] == [SEARCH, SEARCH, ANSWER] and c.final_answer == "answer v0"
    assert c.steps[0].retrieved_ids and "<information>" in c.steps[0].observation
    tp = tokenize_path(eng.tokenizer, c.question, c.path())
    for s, span, info in zip(c.path(), tp.step_spans, tp.info_spans):
        assert s.policy_span == list(span) and s.info_span == (list(info) if info else None)


def test_sample_next_steps_gives_k_siblings(tiny_model_and_tokenizer, corpus, questions):
    eng = _engine(tiny_model_and_tokenizer, corpus, do_sample=False)
    eng.backend = ScriptedBackend(eng.tokenizer)
    chain = eng.rollout(questions[:1])[0]
    eng.cfg.batch_size = 8
    sibs = eng.sample_next_steps([(chain, "0"), (chain, None)], n=4)
    assert [len(x) for x in sibs] == [4, 4] and eng.backend.calls[-1] == 8   # one batched call
    for s in sibs[0] + sibs[1]:
        chain.add_step(s)                                      # ids are unique within the chain
    assert len(chain.children("0")) == 1 + 4 and len(chain.children(None)) == 1 + 4
    assert all(s.action == SEARCH and s.observation for s in sibs[0])
    assert len({s.query for s in sibs[0]}) > 1                 # sampled, not four copies


def test_continue_from_runs_to_the_end(tiny_model_and_tokenizer, corpus, questions):
    eng = _engine(tiny_model_and_tokenizer, corpus, do_sample=False)
    eng.backend = ScriptedBackend(eng.tokenizer)
    chain = eng.rollout(questions[:1])[0]
    out = eng.continue_from([(chain, "0"), (chain, "2")], n=3)
    assert len(out) == 2 and len(out[0]) == 3
    for cont in out[0]:
        assert [s.action for s in cont] == [SEARCH, ANSWER]
        assert cont[0].parent == "0" and cont[1].parent == cont[0].id
    assert out[1] == [[], [], []]                              # the answer step ends the chain already
    ids = [s.id for cont in out[0] for s in cont]
    assert len(set(ids)) == len(ids) and not set(ids) & {s.id for s in chain.steps}


def test_rollout_to_file_resumes_to_the_same_file(tiny_model_and_tokenizer, corpus, questions, tmp_path):
    full = tmp_path / "full.jsonl"
    _engine(tiny_model_and_tokenizer, corpus).rollout_to_file(questions, full)

    part = tmp_path / "part.jsonl"
    eng = _engine(tiny_model_and_tokenizer, corpus)
    real, calls = eng.generate_steps, []

    def crash_after_first_chunk(reqs, sample):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(reqs, sample)

    eng.generate_steps = crash_after_first_chunk
    with pytest.raises(KeyboardInterrupt):
        eng.rollout_to_file(questions, part)
    assert len(read_chains(part)) == 2
    with open(part, "a") as f:
        f.write('{"version": 1, "question_id": "torn')        # a write cut by the kill
    _engine(tiny_model_and_tokenizer, corpus).rollout_to_file(questions, part)
    assert part.read_text() == full.read_text()
    assert [c.question_id for c in read_chains(part)] == ["q0", "q1", "q2", "q3"]
