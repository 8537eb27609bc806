"""The agent protocol: parsing well-formed and malformed steps, and the token masks trainers rely on."""

from __future__ import annotations

from rag_dpo.agent import protocol
from rag_dpo.records import ANSWER, INVALID, SEARCH, Passage, Step


def test_parse_well_formed_steps():
    s = protocol.parse_step("<think>need the director</think>\n<search>Big Stone Gap  director</search> trailing")
    assert (s.action, s.query, s.error) == (SEARCH, "Big Stone Gap director", None)
    a = protocol.parse_step("<think>done</think><answer> Greenwich Village </answer>")
    assert (a.action, a.answer, a.error) == (ANSWER, "Greenwich Village", None)
    # the first closing tag ends the step: an answer after a search is not this step's business
    assert protocol.parse_step("<search>x</search><answer>y</answer>").action == SEARCH


def test_parse_malformed_steps_never_raise():
    assert protocol.parse_step("The answer is Paris.").action == INVALID
    assert "no <search>" in protocol.parse_step("The answer is Paris.").error
    assert "unclosed" in protocol.parse_step("<think>x</think><search>half a query").error
    assert "empty" in protocol.parse_step("<answer>  </answer>").error
    assert protocol.parse_step("").action == INVALID
    assert protocol.truncate_at_stop("a</search>b</answer>c") == "a</search>"


def test_masks_cover_exactly_the_retrieved_tokens(tokenizer):
    obs = protocol.format_observation([Passage("p1", "Paris", "Paris is the capital of France. " * 20)],
                                      tokenizer, max_tokens_per_passage=16)
    steps = [Step("0", None, protocol.format_step("look", SEARCH, "capital of France"), SEARCH,
                  query="capital of France", observation=obs),
             Step("1", "0", protocol.format_step("found", ANSWER, "Paris"), ANSWER, answer="Paris")]
    tp = protocol.tokenize_path(tokenizer, "What is the capital of France?", steps)
    zeros_after_prompt = {i for i in range(tp.prompt_len, len(tp.input_ids)) if tp.policy_mask[i] == 0}
    info = {i for span in tp.info_spans if span for i in range(*span)}
    assert zeros_after_prompt == info and info
    assert tokenizer.decode([tp.input_ids[i] for i in sorted(info)]) == obs
    assert tp.info_spans[1] is None and tp.input_ids[tp.step_spans[1][1] - 1] == tokenizer.eos_token_id
    # the observation was cut to its token budget
    assert len(tokenizer(obs, add_special_tokens=False)["input_ids"]) < 40
    assert protocol.render_context(tokenizer, "Q?", steps[:1]).endswith(obs)
