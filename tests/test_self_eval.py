"""Self-evaluation after the answer (train/self_eval.py) on the tiny model and hand-built rows: where the target
sits and what each loss covers, that the flag off leaves SFT's batch as it was, the self-score scorer (value, ranking,
same tokens as training), best-of-N wiring in eval, and calibration / best-of-group against hand computations."""

from __future__ import annotations

import json

import pytest
import torch

from rag_dpo.agent.protocol import format_step, render_context, render_prompt
from rag_dpo.records import ANSWER, SEARCH, Chain, Label, Step

ANSWER_STEP = format_step("the capital", ANSWER, "Paris")
SEARCH_STEP = format_step("look it up", SEARCH, "capital of France")
OBS = "\n<information>\n[1] France: Paris is the capital of France.\n</information>\n"


def _rows(tok, values=(0.8, 0.0), score_only=(False, True)):
    from datasets import Dataset
    prefix = [Step("0", None, SEARCH_STEP, SEARCH, query="capital of France", observation=OBS)]
    prompt = render_context(tok, "What is the capital of France?", prefix)
    rows = [{"prompt": prompt, "completion": ANSWER_STEP, "completion_info_spans": [], "completion_ends_turn": True,
             "value": values[0], "self_eval_only": score_only[0]},
            {"prompt": render_prompt(tok, "What is the capital of France?"), "completion": SEARCH_STEP,
             "completion_info_spans": [], "completion_ends_turn": False, "value": values[1],
             "self_eval_only": score_only[1]}]
    return Dataset.from_list(rows)


def test_target_sits_after_the_stop_string_and_is_masked_from_the_answer_loss(tokenizer):
    from rag_dpo.train.self_eval import suffix_ids, tokenize_sft_self_eval
    from rag_dpo.train.sft import tokenize_sft
    ds = _rows(tokenizer, score_only=(False, False))
    plain = tokenize_sft(ds.remove_columns(["self_eval_only"]), tokenizer)
    se = tokenize_sft_self_eval(ds, tokenizer)
    eos = tokenizer.eos_token_id
    for i, (p, r) in enumerate(zip(plain, se)):
        n = len(p["input_ids"])
        suffix = suffix_ids(tokenizer, ds[i]["value"])
        # the answer's own EOS ends it; a search step gets one inserted before its score, as context only
        between = [] if i == 0 else [eos]
        assert r["input_ids"] == p["input_ids"] + between + suffix
        assert r["labels"] == p["labels"] + [-100] * (len(between) + len(suffix))   # the step's labels unchanged
        assert r["self_eval_labels"] == [-100] * (n + len(between)) + suffix       # its own labels: the score only
        before = tokenizer.decode(r["input_ids"][:n])
        assert before.endswith("</answer>" + tokenizer.eos_token if i == 0 else "</search>")
        assert p["labels"][-1] == (eos if i == 0 else p["input_ids"][-1])          # no EOS target on the search
        tail = tokenizer.decode(r["input_ids"][n:])
        assert tail == ("Score:7" if i == 0 else tokenizer.eos_token + "Score:0")


def test_a_score_never_follows_a_search_step_directly(tokenizer):
    """Format 1 put `<score>` right after `</search>`, and the DPO-trained policy then wrote `<score>9</score>` as
    its next step after an observation. Now every score, in SFT rows and in both sides of DPO pairs, follows an EOS,
    and the inserted EOS is in no loss."""
    from datasets import Dataset

    from rag_dpo.train.dpo import tokenize_pairs
    from rag_dpo.train.self_eval import SCORE_OPEN, add_pair_suffixes, tokenize_sft_self_eval
    open_ids = tokenizer(SCORE_OPEN, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id

    def before_scores(ids):
        return [ids[i - 1] for i in range(1, len(ids)) if ids[i:i + len(open_ids)] == open_ids]

    for r in tokenize_sft_self_eval(_rows(tokenizer), tokenizer):
        assert before_scores(r["input_ids"]) == [eos]
    prompt = render_prompt(tokenizer, "What is the capital of France?")
    pairs = Dataset.from_list([{"prompt": prompt, "chosen": SEARCH_STEP, "rejected": "no tags here",
                                "chosen_ends_turn": False, "rejected_ends_turn": False},
                               {"prompt": prompt, "chosen": ANSWER_STEP, "rejected": SEARCH_STEP,
                                "chosen_ends_turn": True, "rejected_ends_turn": False}])
    tokenized = tokenize_pairs(pairs, tokenizer)
    out = add_pair_suffixes(tokenized, [1.0, 1.0], [0.0, 0.0], tokenizer)
    for row, before in zip(out, tokenized):
        for side in ("chosen", "rejected"):
            ids, old = row[f"{side}_ids"], before[f"{side}_ids"]
            assert before_scores(ids) == [eos] and ids[:len(old)] == old
            k = len(old) + (old[-1] != eos)                      # where the score starts
            assert row[f"{side}_se"] == [0] * k + [1] * (len(ids) - k)
            assert row[f"{side}_mask"][len(old):] == [0] * (len(ids) - len(old))


def test_score_only_rows_train_the_score_alone_and_flag_off_drops_them(tokenizer):
    from rag_dpo.train.self_eval import tokenize_sft_self_eval, without_score_only_rows
    ds = _rows(tokenizer)
    se = tokenize_sft_self_eval(ds, tokenizer)
    assert all(x == -100 for x in se[1]["labels"]) and any(x != -100 for x in se[1]["self_eval_labels"])
    kept = without_score_only_rows(ds)
    assert len(kept) == 1 and kept[0]["completion"] == ANSWER_STEP


@pytest.fixture
def own_tiny():
    """A tiny model of this test's own: TRL's trainers patch the model they are given (its forward returns the
    fused LM head's outputs afterwards), which would leak into every later test of the session-wide one."""
    from conftest import TOKENIZER_DIR
    from rag_dpo.agent.policy import tiny_policy
    return tiny_policy(TOKENIZER_DIR)


def _trainer(tmp_path, tiny, dataset, weight, self_eval=True):
    from trl import SFTConfig

    from rag_dpo.train.common import hf_args
    from rag_dpo.train.self_eval import self_eval_sft_trainer
    from rag_dpo.train.sft import SFTSettings
    model, tok = tiny
    cfg = SFTSettings(self_eval=self_eval, self_eval_weight=weight, wandb=False, max_steps=1, full_finetune=True,
                      precision="fp32")
    args = hf_args(cfg, tmp_path, SFTConfig, max_length=cfg.max_length, packing=False, dataset_num_proc=None)
    return self_eval_sft_trainer(cfg, model, tok, None, dataset, args, [])


def _nll(model, ids, labels):
    """Mean NLL of the tokens whose label is not -100, by hand."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    lp = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return float(-(lp * keep).sum() / keep.sum())


def test_answer_loss_is_unchanged_and_the_self_eval_loss_covers_only_the_suffix(tmp_path, own_tiny):
    tiny_model_and_tokenizer = own_tiny
    model, tok = tiny_model_and_tokenizer
    ds = _rows(tok, score_only=(False, False)).select([0])
    losses = {}
    for w in (0.0, 1.0):
        tr = _trainer(tmp_path / str(w), tiny_model_and_tokenizer, ds, w)
        batch = tr.data_collator([tr.train_dataset[0]])
        model.eval()
        with torch.no_grad():
            losses[w] = float(tr.compute_loss(model, dict(batch)))
    ids, labels, se = batch["input_ids"], batch["labels"], batch["self_eval_labels"]
    assert losses[0.0] == pytest.approx(_nll(model, ids, labels), rel=1e-4)          # the answer's NLL alone
    assert losses[1.0] - losses[0.0] == pytest.approx(_nll(model, ids, se), rel=1e-4)  # + the suffix's NLL
    # the answer loss does not depend on the score written after it (causal model, suffix outside its labels)
    other = _rows(tok, values=(0.0, 0.0), score_only=(False, False)).select([0])
    tr = _trainer(tmp_path / "other", tiny_model_and_tokenizer, other, 0.0)
    with torch.no_grad():
        assert float(tr.compute_loss(model, dict(tr.data_collator([tr.train_dataset[0]])))) == \
            pytest.approx(losses[0.0], rel=1e-6)


def test_flag_off_trains_on_exactly_todays_batch(tmp_path, tiny_policy_dir, tokenizer, monkeypatch):
    """train_sft with self_eval off hands TRL the rows tokenize_sft always built (score-only rows dropped)."""
    import rag_dpo.train.sft as sft
    seen = {}

    class Stop(Exception):
        pass

    class Recorder:
        def __init__(self, **kw):
            seen.update(kw)
            raise Stop

    monkeypatch.setattr("trl.SFTTrainer", Recorder)
    ds = _rows(tokenizer)
    with pytest.raises(Stop):
        sft.train_sft(sft.SFTSettings(wandb=False), ds, tmp_path / "off", model=str(tiny_policy_dir))
    expected = sft.tokenize_sft(ds.select([0]).remove_columns(["self_eval_only"]), tokenizer)
    assert seen["train_dataset"].column_names == ["input_ids", "labels"]
    assert seen["train_dataset"].to_list() == expected.to_list()
    assert "data_collator" not in seen                     # TRL's own collator, as before


class _StubLM(torch.nn.Module):
    """Logits that put the next-token mass on digits by hand: 3:1 odds for '9' over '0' when the sequence holds
    the word 'good' (token id marker), 1:3 otherwise; every other token far below."""

    def __init__(self, digits, marker):
        super().__init__()
        self.digits, self.marker = digits, marker
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.full((*input_ids.shape, 50000), -30.0)
        for i, row in enumerate(input_ids):
            good = bool((row == self.marker).any())
            logits[i, :, self.digits[9]] = torch.log(torch.tensor(3.0 if good else 1.0))
            logits[i, :, self.digits[0]] = torch.log(torch.tensor(1.0 if good else 3.0))

        class Out:
            pass
        out = Out()
        out.logits = logits
        return out


def test_self_scorer_reads_the_expected_digit_and_ranks_as_its_probabilities_say(tokenizer):
    from rag_dpo.train.self_eval import SelfScorer, digit_ids
    marker = tokenizer(" good", add_special_tokens=False)["input_ids"][-1]
    scorer = SelfScorer(_StubLM(digit_ids(tokenizer), marker), tokenizer, share_prefix=False)   # a stand-in: no cache
    good = Step("1", None, format_step("a good plan", SEARCH, "x"), SEARCH)
    bad = Step("2", None, format_step("a bad plan", SEARCH, "y"), SEARCH)
    scores = scorer.score("Q?", [], [bad, good])
    assert scores == pytest.approx([0.25, 0.75], abs=1e-6)    # E = p(9) * 9/9 + p(0) * 0/9
    assert all(0.0 <= s <= 1.0 for s in scores) and scores[1] > scores[0]


def test_self_scorer_on_the_tiny_model_uses_the_training_tokens(tokenizer, tiny_model_and_tokenizer):
    from rag_dpo.train.self_eval import SCORE_OPEN, SelfScorer, digit_ids, tokenize_sft_self_eval
    model, tok = tiny_model_and_tokenizer
    scorer = SelfScorer(model, tok)
    prefix = [Step("0", None, SEARCH_STEP, SEARCH, query="capital of France", observation=OBS)]
    cand = Step("1", "0", ANSWER_STEP, ANSWER, answer="Paris")
    seq = scorer.sequence("What is the capital of France?", prefix, cand)
    trained = tokenize_sft_self_eval(_rows(tok).select([0]), tok)[0]["input_ids"]
    n_open = len(tok(SCORE_OPEN, add_special_tokens=False)["input_ids"])
    assert seq == trained[:len(seq)] and len(trained) == len(seq) + 1             # then the digit
    search = Step("1", "0", SEARCH_STEP, SEARCH, query="capital of France")      # a search: EOS, then Score:
    trained_search = tokenize_sft_self_eval(_rows(tok).select([1]), tok)[0]["input_ids"]
    seq_search = scorer.sequence("What is the capital of France?", [], search)
    assert seq_search == trained_search[:len(seq_search)] and seq_search[-n_open - 1] == tok.eos_token_id
    path, legacy = seq_search[:-n_open - 1], tok("<score>", add_special_tokens=False)["input_ids"]
    assert SelfScorer(model, tok, fmt=1).sequence("What is the capital of France?", [], search) == path + legacy
    assert SelfScorer(model, tok, fmt=2).sequence("What is the capital of France?", [], search) == \
        path + [tok.eos_token_id] + legacy                                         # older formats as trained
    (probs,) = scorer.digit_probs("What is the capital of France?", prefix, [cand])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
    hand = logits[digit_ids(tok)].softmax(-1)
    assert probs == pytest.approx(hand.tolist(), abs=1e-5)
    (score,) = scorer.score("What is the capital of France?", prefix, [cand])
    assert 0.0 <= score <= 1.0 and score == pytest.approx(sum(p * d / 9 for d, p in enumerate(hand.tolist())))


def test_calibration_matches_a_hand_computation(tmp_path):
    from rag_dpo.train.self_eval import calibration, plot_reliability
    cal = calibration([0.05, 0.15, 0.95, 0.9, 1.0], [0.0, 1.0, 1.0, 0.0, 1.0], bins=10)
    # bins: [0, .1) -> (.05, 0); [.1, .2) -> (.15, 1); [.9, 1] -> scores .95, .9, 1.0 (mean .95), labels mean 2/3
    assert cal["bins"][0]["n"] == 1 and cal["bins"][1]["n"] == 1 and cal["bins"][9]["n"] == 3
    assert cal["bins"][9]["score"] == pytest.approx(0.95) and cal["bins"][9]["label"] == pytest.approx(2 / 3)
    assert cal["ece"] == pytest.approx(0.2 * 0.05 + 0.2 * 0.85 + 0.6 * abs(2 / 3 - 0.95))
    assert cal["mae"] == pytest.approx((0.05 + 0.85 + 0.05 + 0.9 + 0.0) / 5)
    # good steps score .15, .95, 1.0; bad ones .05, .9: 5 of the 6 (good, bad) pairs are ordered right
    assert cal["auroc"] == pytest.approx(5 / 6)
    png = plot_reliability(cal, tmp_path / "rel.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def _labelled_chain():
    c = Chain("q1", "Q?", ["Paris"])
    for sid, parent, ev, me in [("0", None, 0.0, 0.9), ("1", None, 1.0, 0.2), ("2", None, 0.0, 0.1),
                                ("3", "1", 1.0, 0.7), ("4", "1", 0.5, 0.8), ("5", "1", 0.5, 0.3)]:
        c.add_step(Step(sid, parent, "t" + sid, SEARCH, retrieved_ids=["p" + sid],
                        labels={"evidence": Label(ev, ev >= 0.5, "evidence"), "self": Label(me, me >= 0.5, "self")}))
    return c


def test_group_choice_and_chains_calibration_by_hand():
    from rag_dpo.train.self_eval import chains_calibration, group_choice
    g = group_choice([_labelled_chain()], "evidence", "self")
    # group 1 (roots): self picks step 0 (label 0); group 2 (children of 1): picks step 4 (label .5)
    assert g["groups"] == 2 and g["picked"] == pytest.approx(0.25)
    assert g["random"] == pytest.approx((1 / 3 + 2 / 3) / 2) and g["best"] == pytest.approx(1.0)
    # within groups: roots, good step 1 (.2) beats bad 2 (.1) and loses to bad 0 (.9); children all good: no pair
    assert g["auroc_within_group"] == pytest.approx(0.5)
    flipped = _labelled_chain()
    flipped.step("1").labels["self"] = Label(0.95, True, "self")
    assert group_choice([flipped], "evidence", "self")["auroc_within_group"] == pytest.approx(1.0)
    cal = chains_calibration([_labelled_chain()], "evidence")
    assert cal["n"] == 6 and cal["by_action"]["search"]["n"] == 6
    # slots: roots 0, 1, 2 at step0 (good: 1 scored .2; bad: .9, .1), children 3, 4, 5 at step1 (good: .7, .8, .3
    # -- labels .5 count as good -- and no bad one): within step0 1 of 2 pairs right, step1 has no pair
    assert {k: v["n"] for k, v in cal["by_slot"].items()} == {"step0/search": 3, "step1/search": 3}
    assert cal["by_slot"]["step0/search"]["auroc"] == pytest.approx(0.5) and cal["by_slot"]["step1/search"]["auroc"] is None
    assert cal["auroc_within_slot"] == pytest.approx(0.5)
    # across slots: good .2, .7, .8, .3 against bad .9, .1: each good beats .1 and loses to .9
    assert cal["auroc"] == pytest.approx(4 / 8)


def test_stratified_auroc_ignores_what_separates_the_strata():
    """A score that only ranks the strata (high where labels are mostly bad) is below chance overall and at chance
    within the strata; ranking inside each stratum is what it counts."""
    from rag_dpo.metrics import auroc, stratified_auroc
    scores = [0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9]
    good = [True, True, True, False, True, False, False, False]
    strata = ["a"] * 4 + ["b"] * 4
    # good .1 x3 and .9 against bad .1 and .9 x3: ties 3 x .5 + 3 x .5, the .9 over the .1: 1 -> 4 of 16
    assert auroc(scores, good) == pytest.approx(4 / 16)
    assert stratified_auroc(scores, good, strata) == pytest.approx(0.5)
    assert stratified_auroc([0.1, 0.2, 0.9, 0.3], [False, True, True, False], ["a", "a", "b", "b"]) == 1.0
    assert stratified_auroc([0.1, 0.2], [True, True], ["a", "a"]) is None


def test_random_scorer_is_seeded_and_uniform_range():
    from rag_dpo.train.self_eval import RandomScorer
    cands = [Step(str(i), None, f"t{i}", SEARCH) for i in range(4)]
    a, b = RandomScorer(0).score("Q", [], cands), RandomScorer(0).score("Q", [], cands)
    assert a == b and all(0 <= x < 1 for x in a) and a != RandomScorer(1).score("Q", [], cands)


def test_eval_self_and_random_best_of_n_pick_the_top_scored_candidate(tmp_path, tiny_model_and_tokenizer):
    from conftest import HOTPOT_DEV
    from rag_dpo.agent.rollout import RolloutConfig
    from rag_dpo.eval.evaluate import evaluate
    from rag_dpo.records import read_chains
    data = tmp_path / "hotpot2.jsonl"
    data.write_text("".join(HOTPOT_DEV.read_text().splitlines(keepends=True)[:2]))
    cfg = RolloutConfig(max_new_tokens=4, max_steps=2, batch_size=4, progress=False)
    methods = ["agent-self-bon", "agent-random-bon"]
    res = evaluate(data, policy="tiny", split="all", limit=2, out_dir=tmp_path / "ev", rollout=cfg, bon_n=3,
                   model_and_tokenizer=tiny_model_and_tokenizer, use_wandb=False, methods=methods)
    assert list(res) == methods
    chains = read_chains(tmp_path / "ev" / "chains.jsonl")
    for method, label in (("agent-self-bon", "self"), ("agent-random-bon", "random")):
        mine = [c for c in chains if c.method == method]
        assert len(mine) == 2
        for c in mine:
            first = c.children(None)
            assert len(first) == 3 and all(0.0 <= s.labels[label].value <= 1.0 for s in first)
            assert c.path()[0].id == max(first, key=lambda s: s.labels[label].value).id


def test_self_eval_data_rows_hold_chosen_and_score_only_steps(tokenizer):
    from rag_dpo.pairs.builders import PairConfig
    from rag_dpo.train.self_eval import self_eval_sft_rows
    rows = self_eval_sft_rows([_labelled_chain()], tokenizer, PairConfig(margin=0.5), "evidence")
    trained = [r for r in rows if not r["self_eval_only"]]
    only = [r for r in rows if r["self_eval_only"]]
    assert sorted(r["completion"] for r in trained) == ["t1", "t3"]      # best of each group (margin 0.5)
    assert sorted(r["completion"] for r in only) == ["t0", "t2", "t4", "t5"]
    assert {r["completion"]: r["value"] for r in only} == {"t0": 0.0, "t2": 0.0, "t4": 0.5, "t5": 0.5}
    assert json.dumps(rows)   # plain data, saveable


def _dpo(tmp_path, tiny, weight, self_eval=True):
    from datasets import Dataset

    from rag_dpo.train.dpo import DPOSettings, build_dpo_trainer
    model, tok = tiny
    prompt = render_prompt(tok, "What is the capital of France?")
    ds = Dataset.from_list([{"prompt": prompt, "chosen": ANSWER_STEP, "rejected": SEARCH_STEP,
                             "chosen_info_spans": [], "rejected_info_spans": [], "chosen_ends_turn": True,
                             "rejected_ends_turn": False, "chosen_value": 1.0, "rejected_value": 0.0}])
    cfg = DPOSettings(self_eval=self_eval, self_eval_weight=weight, wandb=False, max_steps=1, full_finetune=True,
                      precision="fp32", per_device_train_batch_size=1)
    trainer, _ = build_dpo_trainer(cfg, ds, tmp_path, model="tiny")
    return trainer


def test_dpo_suffix_is_outside_every_dpo_loss_and_has_its_own_term(tmp_path, own_tiny, monkeypatch):
    import rag_dpo.train.dpo as dpo
    tiny_model_and_tokenizer = own_tiny
    from rag_dpo.train.self_eval import suffix_ids
    model, tok = tiny_model_and_tokenizer
    monkeypatch.setattr(dpo, "load_trainable", lambda spec, settings: (model, tok, None))
    out = {}
    for name, w, on in (("plain", 0.0, False), ("w0", 0.0, True), ("w1", 1.0, True)):
        tr = _dpo(tmp_path / name, tiny_model_and_tokenizer, w, on)
        batch = tr.data_collator([tr.train_dataset[0]])
        model.eval()
        with torch.no_grad():
            loss = float(tr.compute_loss(model, dict(batch)))
        out[name] = (loss, tr._metrics["eval"]["logps/chosen"][-1], tr._metrics["eval"]["logps/rejected"][-1], batch)
    # DPO's log-probs and loss are those of the rows without the suffix
    assert out["w0"][1] == pytest.approx(out["plain"][1], rel=1e-5)
    assert out["w0"][2] == pytest.approx(out["plain"][2], rel=1e-5)
    assert out["w0"][0] == pytest.approx(out["plain"][0], rel=1e-5)
    batch = out["w1"][3]
    se, cm, ids = batch["self_eval_mask"], batch["completion_mask"], batch["input_ids"]
    assert not bool((se.bool() & cm.bool()).any())               # never both a DPO and a self-eval target
    for row, value in ((0, 1.0), (1, 0.0)):                     # chosen then rejected, each ends with its suffix
        assert ids[row][se[row].bool()].tolist() == suffix_ids(tok, value)
    labels = ids.masked_fill(se == 0, -100)
    assert out["w1"][0] - out["w0"][0] == pytest.approx(_nll(model, ids, labels), rel=1e-4)


def test_calibration_command_scores_writes_and_agrees_with_its_files(tmp_path, tiny_policy_dir):
    from typer.testing import CliRunner

    from rag_dpo.cli import app
    from rag_dpo.records import read_chains, write_chains
    from rag_dpo.train.self_eval import chains_calibration
    chain = _labelled_chain()
    for s in chain.steps:
        del s.labels["self"]
    write_chains(tmp_path / "labels.jsonl", [chain])
    out = tmp_path / "cal"
    res = CliRunner().invoke(app, ["self-eval-calibration", "--policy", str(tiny_policy_dir), "--labels",
                                   str(tmp_path / "labels.jsonl"), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cal = json.loads((out / "calibration.json").read_text())
    scored = read_chains(out / "scored_chains.jsonl")
    assert all(0.0 <= s.labels["self"].value <= 1.0 for s in scored[0].steps)
    assert cal["ece"] == pytest.approx(chains_calibration(scored, "evidence")["ece"]) and cal["n"] == 6
    assert cal["choice"]["self"]["groups"] == 2 and (out / "reliability.png").stat().st_size > 1000
    assert "ECE" in res.output


def test_a_trained_folder_records_its_score_format_and_the_scorer_reads_it(tmp_path):
    """Policies trained before format 2 (train_done.json without the key) are scored the way they were trained."""
    from rag_dpo.train.common import self_eval_extra
    from rag_dpo.train.dpo import DPOSettings
    from rag_dpo.train.self_eval import SCORE_FORMAT, score_format
    from rag_dpo.train.sft import SFTSettings
    assert SCORE_FORMAT == 3
    assert self_eval_extra(DPOSettings(self_eval=True)) == {"self_eval_format": 3}
    assert self_eval_extra(SFTSettings(self_eval=False)) == {}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_done.json").write_text(json.dumps({"global_step": 25}))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "train_done.json").write_text(json.dumps(self_eval_extra(SFTSettings(self_eval=True))))
    assert score_format(tmp_path / "old") == 1 and score_format(tmp_path / "new") == 3
    assert score_format("HuggingFaceTB/SmolLM2-135M-Instruct") == 3           # not a trained folder: today's


def test_dpo_score_stage_trains_the_score_on_pool_steps_after_dpo(tmp_path, tiny_policy_dir, tokenizer):
    """`self_eval_pool_rows`: DPO into trained/dpo, then the score alone on up to N labelled pool steps per question
    (the pool the pairs folder names), continuing the DPO adapter; a pairs object without its folder is refused."""
    from datasets import Dataset
    from safetensors.torch import load_file

    from rag_dpo.errors import InputError
    from rag_dpo.pairs.builders import PairConfig, build_dataset
    from rag_dpo.records import write_chains
    from rag_dpo.train.dpo import DPOSettings, train_dpo
    from rag_dpo.train.self_eval import score_only_rows
    labels = tmp_path / "labels.jsonl"
    write_chains(labels, [_labelled_chain()])
    pairs = build_dataset(labels, "step", tmp_path / "pairs", tokenizer, PairConfig(margin=0.5, annotator="evidence"))
    cfg = DPOSettings(self_eval=True, self_eval_pool_rows=4, wandb=False, max_steps=2, precision="fp32",
                      per_device_train_batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-2)
    out = train_dpo(cfg, pairs, tmp_path / "trained", model=str(tiny_policy_dir))
    assert json.loads((out / "dpo" / "train_done.json").read_text())["self_eval_format"] == 3   # stage 1: DPO
    done = json.loads((out / "train_done.json").read_text())
    assert done["self_eval_format"] == 3 and "self_eval_loss" in done                          # stage 2: the score
    stage = json.loads((out / "score_stage.json").read_text())
    assert stage["rows"] == 4 and stage["questions"] == 1 and stage["start"] == str(out / "dpo")
    rows = score_only_rows([_labelled_chain()], tokenizer, "evidence", 4)
    assert len(rows) == 4 and all(r["self_eval_only"] for r in rows)      # 4 of the 6 labelled steps, no answer row
    before = load_file(str(out / "dpo" / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert train_dpo(cfg, pairs, out, model=str(tiny_policy_dir)) == out                      # done: returns at once
    with pytest.raises(InputError, match="self_eval_pool_rows"):
        train_dpo(cfg, Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]), tmp_path / "t2",
                  model=str(tiny_policy_dir))


def test_self_scorer_scores_the_same_with_the_context_encoded_once(tiny_model_and_tokenizer):
    from rag_dpo.train.self_eval import SelfScorer
    model, tok = tiny_model_and_tokenizer
    prefix = [Step("0", None, SEARCH_STEP, SEARCH, query="capital of France", observation=OBS)]
    cands = [Step("1", "0", ANSWER_STEP, ANSWER, answer="Paris"),
             Step("2", "0", format_step("need more", SEARCH, "Paris population"), SEARCH, query="Paris population"),
             Step("3", "0", format_step("it is Lyon", ANSWER, "Lyon"), ANSWER, answer="Lyon")]
    q = "What is the capital of France?"
    shared = SelfScorer(model, tok, batch_size=2).score(q, prefix, cands)
    whole = SelfScorer(model, tok, batch_size=2, share_prefix=False).score(q, prefix, cands)
    assert shared == pytest.approx(whole, abs=1e-5) and len(set(shared)) == 3
