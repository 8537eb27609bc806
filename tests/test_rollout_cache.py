"""Key/value reuse (`cache: prefix`) against full re-encoding (`cache: none`): the same tokens, step after step."""

from __future__ import annotations

import copy
import dataclasses
import os
import random

import pytest
import torch
from conftest import ToyRetriever

from rag_dpo.agent import kv_cache
from rag_dpo.agent.kv_cache import PrefixStore
from rag_dpo.agent.rollout import (CachedHFBackend, HFBackend, RolloutConfig, RolloutEngine, _nucleus_pick,
                                   seeded_sample)
from rag_dpo.records import Corpus, Passage, Question


def _contexts(tok, n, seed=0):
    """Contexts sharing a system-prompt-like prefix, of different lengths (so batches are left-padded)."""
    rng = random.Random(seed)
    head = tok("You answer multi-hop questions by searching a corpus. Think inside tags.",
               add_special_tokens=False)["input_ids"]
    return [head + [rng.randrange(1000, 20000) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _eos_that_ends_rows(model, tok, contexts, cfg, sample):
    """A copy of the tokenizer whose eos is a token the random model emits mid-generation in some rows only, so rows
    finish at different steps (a random model never writes </search> or the real eos)."""
    outs = CachedHFBackend(model, tok).generate(contexts, list(range(len(contexts))), sample, cfg)
    counts: dict[int, int] = {}
    for text, _ in outs:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for t in set(ids[1:-1]):
            counts[t] = counts.get(t, 0) + 1
    token = max(counts, key=lambda t: (0 < counts[t] < len(contexts), counts[t]))
    tok2 = copy.deepcopy(tok)
    tok2.eos_token = tok.convert_ids_to_tokens(token)
    return tok2


@pytest.mark.parametrize("sample", [False, True])
def test_cached_steps_equal_full_reencoding(tiny_model_and_tokenizer, sample):
    """Several steps, each context extended by its own output plus an 'observation'; rows finish at different
    token counts; greedy and seeded sampling both identical to `generate` over the whole context."""
    model, tok = tiny_model_and_tokenizer
    cfg = RolloutConfig(max_new_tokens=10, temperature=1.0, top_p=0.9)
    contexts = _contexts(tok, 6)
    tok = _eos_that_ends_rows(model, tok, contexts, cfg, sample)
    full, cached = HFBackend(model, tok), CachedHFBackend(model, tok)
    rng = random.Random(1)
    lengths = set()
    for step in range(3):
        seeds = [step * 100 + i for i in range(len(contexts))] if step else list(range(len(contexts)))
        a = full.generate(contexts, seeds, sample, cfg)
        b = cached.generate(contexts, seeds, sample, cfg)
        assert a == b
        lengths |= {n for _, n in b}
        contexts = [c + tok(t, add_special_tokens=False)["input_ids"] + [rng.randrange(1000, 20000)
                                                                         for _ in range(rng.randrange(5, 30))]
                    for c, (t, _) in zip(contexts, a)]
    assert len(lengths) > 1                                     # rows did finish at different steps
    assert cached.timing["cached_tokens"] > cached.timing["prefill_tokens"] / 2   # and the prefixes were reused


def test_siblings_from_one_prefix_equal_separate_generations(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    cfg = RolloutConfig(max_new_tokens=8, temperature=1.0, top_p=0.95)
    prefix = _contexts(tok, 1, seed=3)[0]
    together = CachedHFBackend(model, tok)
    siblings = together.generate([prefix] * 4, [11, 12, 13, 14], True, cfg)
    assert together.timing["prefill_tokens"] == len(prefix)      # the shared prefix was prefilled once
    apart = [HFBackend(model, tok).generate([prefix], [s], True, cfg)[0] for s in (11, 12, 13, 14)]
    assert siblings == apart
    assert len({t for t, _ in siblings}) > 1


def test_engine_rollouts_equal_with_and_without_cache(tiny_model_and_tokenizer):
    """Greedy chains are identical; sampled siblings too, except where float rounding (a different batch layout
    gives logits within 1e-6) moves a draw across a bin edge of the tiny random model's near-flat distribution."""
    model, tok = tiny_model_and_tokenizer
    corpus = Corpus([Passage(f"p{i}", f"Title {i}", f"Passage number {i} says something.") for i in range(6)])
    qs = [Question(f"q{i}", f"What is thing {i}?", [f"thing {i}"], [f"p{i}"]) for i in range(4)]
    runs = {}
    for cache in ("none", "prefix"):
        cfg = RolloutConfig(max_new_tokens=6, max_steps=3, batch_size=3, do_sample=False, progress=False, cache=cache)
        eng = RolloutEngine(model, tok, ToyRetriever(corpus), corpus, cfg, model_name="tiny")
        chains = eng.rollout(qs)
        siblings = eng.sample_next_steps([(c, None) for c in chains], 3)
        runs[cache] = ([c.to_dict() for c in chains], [s.text for row in siblings for s in row])
        split = eng.time_split()
        assert split["prefill"] > 0 and split["decode"] > 0 and split["prefill_tokens"] > 0
    assert runs["none"][0] == runs["prefix"][0]
    same = [a == b for a, b in zip(runs["none"][1], runs["prefix"][1])]
    assert len(same) == 12 and sum(same) >= 10
    assert len(set(runs["prefix"][1])) > 4          # the siblings were sampled, not copies


def test_prefix_store_blocks_lookup_and_eviction():
    store = PrefixStore(block=4, max_bytes=3 * 4 * 4)       # room for three blocks of 1x1x1x4x1 float32
    kv = torch.arange(12, dtype=torch.float32).reshape(1, 1, 1, 12, 1)
    tokens = list(range(12))
    store.insert(tokens, kv, 0)
    n, blocks = store.lookup(tokens)
    assert n == 8 and torch.equal(torch.cat(blocks, 3), kv[:, :, :, :8])   # one token always left to prefill
    assert store.lookup(tokens + [99])[0] == 12
    assert store.lookup([0, 1, 2, 7] + tokens[4:])[0] == 0       # same later block after another prefix: no hit
    store.insert([50 + t for t in tokens[:4]], kv[:, :, :, :4], 0)   # a fourth block evicts the oldest
    assert len(store.blocks) == 3 and store.bytes <= store.max_bytes
    assert store.lookup(tokens + [99])[0] == 0                   # the first block went, so nothing is reachable


def test_shortlisted_nucleus_draw_equals_full_sort():
    torch.manual_seed(0)
    scores = torch.randn(6, 500) * torch.tensor([[8.0], [8.0], [0.5], [8.0], [0.1], [4.0]])   # peaked and flat rows
    gens_a = [torch.Generator().manual_seed(s) for s in range(6)]
    gens_b = [torch.Generator().manual_seed(s) for s in range(6)]
    for _ in range(5):
        a = seeded_sample(scores, gens_a, 0.7, 0.9)
        b = seeded_sample(scores, gens_b, 0.7, 0.9, shortlist=16)
        assert torch.equal(a, b)
    probs = torch.softmax(scores / 0.7, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    picked = _nucleus_pick(sorted_p, order, torch.zeros(6), 0.9)
    assert torch.equal(picked.squeeze(1), order[:, 0])           # u = 0 draws the most likely token


def test_clear_cache_after_a_weight_change(tiny_model_and_tokenizer):
    """Stored keys/values belong to the weights that made them: after an update, `clear_cache` (which PPO calls
    every round) makes the engine agree with a fresh one again."""
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    cfg = RolloutConfig(max_new_tokens=6)
    contexts = _contexts(tok, 3, seed=5)
    backend = CachedHFBackend(model, tok)
    backend.generate(contexts, [1, 2, 3], False, cfg)
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.mul_(1.5)
    fresh = HFBackend(model, tok).generate(contexts, [1, 2, 3], False, cfg)
    backend.clear()
    assert backend.generate(contexts, [1, 2, 3], False, cfg) == fresh


def test_bf16_runs_the_adapter_unmerged_in_float32_and_keeps_its_change(tmp_path):
    """`merge_adapter="auto"` merges a LoRA into float32 weights only; in bf16 the adapter stays float32 on the
    bf16 base, and the logits move the way the float32 policy's do. (Merging into bf16 is not tested as worse: on
    a tiny random model bf16's activation rounding, not the weights', dominates the error; measured in the docs.)"""
    from peft import LoraConfig, get_peft_model

    from rag_dpo.agent.policy import load_policy, tiny_policy
    from conftest import TOKENIZER_DIR
    model, tok = tiny_policy(TOKENIZER_DIR, hidden=128, layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok("Which city is the capital of France? The capital of France is Paris.")["input_ids"]])

    def logits(spec, dtype, merge):
        m, _ = load_policy(str(tmp_path / spec), dtype=dtype, merge_adapter=merge)
        with torch.no_grad():
            return m, m(input_ids=ids).logits.float()

    _, base32 = logits("base", torch.float32, False)
    _, tuned32 = logits("adapter", torch.float32, "auto")
    _, base16 = logits("base", torch.bfloat16, False)
    unmerged, unmerged16 = logits("adapter", torch.bfloat16, "auto")
    assert hasattr(unmerged, "peft_config")                                 # auto: not merged in bf16 ...
    assert all(p.dtype == torch.float32 for n, p in unmerged.named_parameters() if "lora_" in n)   # ... fp32 adapter
    change32, change16 = (tuned32 - base32).flatten(), (unmerged16 - base16).flatten()
    assert float(torch.corrcoef(torch.stack([change32, change16]))[0, 1]) > 0.5
    merged32, _ = logits("adapter", torch.float32, "auto")
    assert not hasattr(merged32, "peft_config")                            # float32: merged (faster)


@pytest.mark.parametrize("sample", [False, True])
def test_a_banned_string_never_appears_and_both_engines_ban_it_alike(tiny_model_and_tokenizer, sample):
    """`banned` masks the token that would complete a banned sequence (transformers' bad_words_ids rule): the
    cached engine's own loop and `generate` give the same steps, none holding the sequence, and a row that wrote it
    without the ban writes something else."""
    from rag_dpo.agent.rollout import banned_ids
    model, tok = tiny_model_and_tokenizer
    cfg = RolloutConfig(max_new_tokens=8, temperature=1.0, top_p=0.9)
    contexts = _contexts(tok, 5, seed=3)
    seeds = list(range(len(contexts)))
    free = CachedHFBackend(model, tok).generate(contexts, seeds, sample, cfg)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t, _ in free]
    pair = next(row[i:i + 2] for row in ids for i in range(1, len(row) - 1)
                if banned_ids(tok, [tok.decode(row[i:i + 2])]) == [row[i:i + 2]])   # a two-token string it wrote
    text = tok.decode(pair)
    banned = dataclasses.replace(cfg, banned=(text,))
    a = HFBackend(model, tok).generate(contexts, seeds, sample, banned)
    b = CachedHFBackend(model, tok).generate(contexts, seeds, sample, banned)
    assert a == b
    for (t, _), (t0, _) in zip(b, free):
        got = tok(t, add_special_tokens=False)["input_ids"]
        assert all(got[i:i + 2] != pair for i in range(len(got) - 1))
    assert [t for t, _ in b] != [t for t, _ in free]


def test_vllm_requests_carry_row_seeds_stop_strings_and_budget(monkeypatch, tiny_model_and_tokenizer):
    """vLLM is not installed here: a stand-in module records what the backend asks it for."""
    import sys
    import types

    from rag_dpo.agent import protocol
    from rag_dpo.agent.rollout import VLLMBackend

    class Params:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm=False):
            self.seen = (prompts, params)
            out = types.SimpleNamespace(text="<think>x</think>\n<search>q</search> trailing", token_ids=[1, 2, 3])
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = Params
    vllm.inputs = types.ModuleType("vllm.inputs")
    vllm.inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", vllm.inputs)
    llm = FakeLLM()
    backend = VLLMBackend("unused", tiny_model_and_tokenizer[1], llm=llm)
    cfg = RolloutConfig(max_new_tokens=9, temperature=0.7, top_p=0.9)
    out = backend.generate([[5, 6], [7]], [123, 456], True, cfg)
    assert out == [("<think>x</think>\n<search>q</search>", 3)] * 2          # cut at the stop tag
    prompts, params = llm.seen
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]
    assert [p.seed for p in params] == [123, 456]
    assert all(p.stop == protocol.STOP_STRINGS and p.max_tokens == 9 and p.temperature == 0.7 and p.top_p == 0.9
               for p in params)
    _, greedy = VLLMBackend.requests([[5]], [1], False, cfg)
    assert greedy[0].temperature == 0.0 and greedy[0].seed is None and not hasattr(greedy[0], "bad_words")
    _, banned = VLLMBackend.requests([[5]], [1], False, dataclasses.replace(cfg, banned=("<score>",)))
    assert banned[0].bad_words == ["<score>"]


def test_default_cache_is_the_measured_faster_engine_per_machine(monkeypatch, tiny_model_and_tokenizer):
    """Key/value reuse without CUDA, `generate` with it (measured on an H200); "auto" resolves the same way and the
    resolved value is what configs, recipes and the engine record; an explicit choice is kept on either machine."""
    from rag_dpo.errors import InputError
    from rag_dpo.pipeline.recipe import load_recipe
    model, tok = tiny_model_and_tokenizer
    corpus = Corpus([Passage("p0", "T", "text")])
    for cuda, expected, backend in ((False, "prefix", CachedHFBackend), (True, "none", HFBackend)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert RolloutConfig().cache == RolloutConfig(cache="auto").cache == expected
        assert RolloutConfig(cache="prefix").cache == "prefix" and RolloutConfig(cache="none").cache == "none"
        assert load_recipe("recipes/dpo_step.yaml").rollout.cache == expected
        assert load_recipe("recipes/dpo_step.yaml", ["rollout.cache=auto"]).rollout.cache == expected
        engine = RolloutEngine(model, tok, ToyRetriever(corpus), corpus, RolloutConfig(progress=False))
        assert type(engine.backend) is backend
    with pytest.raises(InputError, match="rollout.cache"):
        load_recipe("recipes/dpo_step.yaml", ["rollout.cache=static"])


def test_auto_backend_is_hf_without_vllm(tiny_model_and_tokenizer):
    from rag_dpo.agent.rollout import resolve_backend
    from rag_dpo.errors import InputError
    assert resolve_backend("auto", tiny_model_and_tokenizer[0]) == "hf"       # vllm is not installed here
    with pytest.raises(InputError):
        resolve_backend("tgi")


@pytest.mark.gpu
def test_cached_steps_equal_full_reencoding_on_cuda(tiny_model_and_tokenizer):
    """The same reuse on CUDA (skipped without a GPU): greedy float32, two steps, identical to `generate`."""
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model).to("cuda")
    cfg = RolloutConfig(max_new_tokens=8)
    contexts = _contexts(tok, 4, seed=7)
    full, cached = HFBackend(model, tok), CachedHFBackend(model, tok)
    for _ in range(2):
        a = full.generate(contexts, [0, 1, 2, 3], False, cfg)
        assert cached.generate(contexts, [0, 1, 2, 3], False, cfg) == a
        contexts = [c + tok(t, add_special_tokens=False)["input_ids"] + [1000 + len(c)] * 5 for c, (t, _) in zip(contexts, a)]
    assert cached.timing["cached_tokens"] > 0


def test_cached_batches_count_distinct_contexts(tiny_model_and_tokenizer):
    """The plain backend gets `batch_size` rows per call; the cached one every row at once (it admits
    `batch_size // 2` distinct contexts at a time, siblings together)."""
    model, tok = tiny_model_and_tokenizer
    corpus = Corpus([Passage("p0", "T", "text")])
    sizes = {}
    for cache in ("none", "prefix"):
        eng = RolloutEngine(model, tok, ToyRetriever(corpus), corpus,
                            RolloutConfig(max_new_tokens=3, batch_size=2, cache=cache, progress=False))
        calls = []
        inner = eng.backend.generate
        eng.backend.generate = lambda c, s, sample, cfg: calls.append(len(c)) or inner(c, s, sample, cfg)
        prefixes = _contexts(tok, 3, seed=9)
        eng.generate_texts([p for p in prefixes for _ in range(4)], list(range(12)), True)
        sizes[cache] = calls
    assert sizes == {"none": [2] * 6, "prefix": [12]}        # one call: the cached backend batches continuously


def test_rows_stop_at_their_stop_string_while_others_go_on(tiny_model_and_tokenizer):
    """Scripted logits: five rows write '<think>a</think> <search>who</search> then more', one starting later in
    it; each row's step ends at its stop tag and counts exactly its own tokens, also while finished rows still sit
    in the batch (a quarter of it must finish before they leave)."""
    model, tok = tiny_model_and_tokenizer
    script = tok("<think>a</think> <search>who</search> then more words", add_special_tokens=False)["input_ids"]
    backend = CachedHFBackend(model, tok)

    def scripted_forward(ids, positions, cache, q):
        """The token after position p is script[p - 1]: a context of length 2 + s starts s tokens in."""
        cache.length += q
        logits = torch.zeros(ids.shape[0], model.config.vocab_size)
        logits[torch.arange(ids.shape[0]), [script[min(int(p) - 1, len(script) - 1)] for p in positions[:, -1]]] = 1
        return logits

    backend._forward = scripted_forward
    out = backend.generate([[5, 6], [7, 8], [9, 10], [11, 12], [13, 14, 15, 16, 17]], [0] * 5, False,
                           RolloutConfig(max_new_tokens=30))
    stop = next(i + 1 for i in range(len(script)) if tok.decode(script[:i + 1]).endswith("</search>"))
    assert out[:4] == [(tok.decode(script[:stop]), stop)] * 4
    assert out[4] == (tok.decode(script[3:stop]), stop - 3)


@pytest.mark.parametrize("whole", [False, True])
def test_continuous_batching_joins_groups_into_the_running_batch(tiny_model_and_tokenizer, monkeypatch, whole):
    """Groups admitted while other rows still decode (right-aligned to one column, some with stored prefixes that a
    prefill must not overwrite) generate what each row generates alone. `whole`: the caches the bf16 CPU attention
    gets (every column read, unwritten ones masked), here in float32 where its attention falls back to SDPA."""
    model, tok = tiny_model_and_tokenizer
    cfg = RolloutConfig(max_new_tokens=10, batch_size=2, decode_rows=2)
    first = _contexts(tok, 6, seed=1)
    tok = _eos_that_ends_rows(model, tok, first, cfg, False)
    joins = []
    real_concat = kv_cache.BatchCache.concat
    monkeypatch.setattr(kv_cache.BatchCache, "concat",
                        staticmethod(lambda a, b, cap: joins.append((a.length, b.length)) or real_concat(a, b, cap)))
    backend = CachedHFBackend(model, tok, block=4)
    backend.cpu_attention = whole
    texts = backend.generate(first, list(range(6)), False, cfg)
    assert texts == [HFBackend(model, tok).generate([c], [0], False, cfg)[0] for c in first]
    assert len({n for _, n in texts}) > 1 and joins and any(a != b for a, b in joins)
    grown = [c + tok(t, add_special_tokens=False)["input_ids"] + list(range(100, 102 + 3 * i))
             for i, (c, (t, _)) in enumerate(zip(first, texts))]
    rows = grown + first[:2]
    got = backend.generate(rows, list(range(len(rows))), False, cfg)
    assert got == [HFBackend(model, tok).generate([r], [0], False, cfg)[0] for r in rows]
    assert backend.timing["cached_tokens"] > backend.timing["prefill_tokens"]
    with torch.inference_mode():                    # the prefill's logits themselves, against a full forward
        logits, _, pos, order = backend._prefill(rows, 4)
        assert sorted(order) == list(range(len(rows)))
        for row, lg, p in zip([rows[r] for r in order], logits, pos.tolist()):
            assert p == len(row)
            torch.testing.assert_close(lg, model(input_ids=torch.tensor([row])).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_batch_cache_rows_leave_in_place_and_siblings_repeat():
    from rag_dpo.agent.kv_cache import BatchCache
    cache = BatchCache(2, 4, 1, 3, 2, torch.float32, "cpu")
    for i, t in enumerate(cache.kv):
        t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) + 100 * i)
    cache.valid[:, 0] = torch.tensor([True, False, True, False])
    before, ptrs = [t.clone() for t in cache.kv], [t.data_ptr() for t in cache.kv]
    cache.select(torch.tensor([1, 3]))                      # rows leaving: moved up, no second buffer
    assert [t.data_ptr() for t in cache.kv] == ptrs and cache.rows == 2
    for t, b in zip(cache.kv, before):
        torch.testing.assert_close(t, b[:, [1, 3]])
    assert cache.valid[:, 0].tolist() == [False, False]
    cache.select(torch.tensor([0, 0, 1]))                   # siblings: repeated rows
    for t, b in zip(cache.kv, before):
        torch.testing.assert_close(t, b[:, [1, 1, 3]])
    assert cache.row(2, slice(0, 2)).shape == (2, 2, 1, 2, 2)
    torch.testing.assert_close(cache.row(2, slice(0, 2))[1], before[1][:, 3, :, 0:2])


def test_batch_cache_concat_right_aligns_and_frees_its_parts_a_layer_at_a_time(monkeypatch):
    """The joined cache is built layer by layer and each part's layer is dropped once copied, so the join never
    holds both parts and the whole result (the bf16 tree search's peak memory was that copy)."""
    import weakref

    from rag_dpo.agent.kv_cache import BatchCache
    a, b = BatchCache(3, 2, 1, 8, 2, torch.float32, "cpu"), BatchCache(3, 1, 1, 6, 2, torch.float32, "cpu")
    for c, length, base in ((a, 4, 0.0), (b, 2, 1000.0)):
        for i, t in enumerate(c.kv):
            t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) + base + 100 * i)
        c.valid[:, :length] = True
        c.length = length
    expect = [(ta[:, :, :, :4].clone(), tb[:, :, :, :2].clone()) for ta, tb in zip(a.kv, b.kv)]
    refs = [weakref.ref(t) for t in a.kv + b.kv]
    del t
    seen = []                                               # parts' layers still alive when each layer is made
    real = kv_cache.torch.zeros
    monkeypatch.setattr(kv_cache.torch, "zeros", lambda *s, **k: seen.append(sum(r() is not None for r in refs))
                        or real(*s, **k))
    out = BatchCache.concat(a, b, 7)
    monkeypatch.undo()
    assert seen[1:] == [6, 4, 2]                            # (the valid mask first) two of six freed per layer
    assert out.rows == 3 and out.length == 4 and out.kv[0].shape == (2, 3, 1, 7, 2)
    for t, (ea, eb) in zip(out.kv, expect):
        torch.testing.assert_close(t[:, :2, :, :4], ea)
        torch.testing.assert_close(t[:, 2:, :, 2:4], eb)    # right-aligned to the same next column
    assert out.valid[:, :5].tolist() == [[True] * 4 + [False]] * 2 + [[False, False, True, True, False]]


def test_prefill_split_by_tail_length_gives_the_same_steps(tiny_model_and_tokenizer, monkeypatch):
    """Tails of very different lengths are prefilled in several forwards (less padding) and stacked into one batch;
    the steps equal one padded forward's, and identical contexts still expand from one prefill."""
    model, tok = tiny_model_and_tokenizer
    cfg = RolloutConfig(max_new_tokens=6, batch_size=64)
    contexts = _contexts(tok, 10, seed=5)
    contexts = contexts + [contexts[3], contexts[3]]             # siblings of one context
    forwards = {}
    outs = {}
    for name, pad, min_rows in (("one", 10.0, 64), ("split", 0.0, 1), ("split3", 0.0, 3)):
        monkeypatch.setattr(CachedHFBackend, "PREFILL_PAD", pad)
        monkeypatch.setattr(CachedHFBackend, "PREFILL_MIN_ROWS", min_rows)
        backend = CachedHFBackend(model, tok)
        calls = []
        real = backend._prefill_part
        backend._prefill_part = (lambda ctxs, hits, cache, _r=real, _c=calls:
                                 _c.append(len(ctxs)) or _r(ctxs, hits, cache))
        outs[name] = backend.generate(contexts, list(range(len(contexts))), False, cfg)
        forwards[name] = calls
        assert backend.timing["prefill_tokens"] == sum(len(c) for c in contexts[:10])   # siblings prefilled once
    assert forwards["one"] == [10] and len(forwards["split"]) > 3 and sum(forwards["split"]) == 10
    assert outs["split"] == outs["one"] == outs["split3"]
    # distinct contexts come back in part order with the request each row belongs to: no reordering copy
    monkeypatch.setattr(kv_cache.BatchCache, "select", lambda self, rows: pytest.fail("rows were reordered"))
    with torch.inference_mode():
        logits, cache, pos, order = CachedHFBackend(model, tok)._prefill(contexts[:10], 6)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert pos.tolist() == [len(contexts[r]) for r in order] and cache.rows == 10
    assert forwards["split3"] == [3, 3, 4]                   # a last part under PREFILL_MIN_ROWS joins the one before


def test_a_prefix_every_context_shares_is_encoded_once(tiny_model_and_tokenizer):
    """A fresh engine's first batch: every question starts with the same system prompt, which is prefilled once
    (whole blocks) and reused by every row, with the same steps as without the store's help."""
    model, tok = tiny_model_and_tokenizer
    cfg = RolloutConfig(max_new_tokens=6, batch_size=64)
    prompt = tok("You answer multi-hop questions by searching a corpus of passages. Think inside tags, then "
                 "search with a query or answer the question in a few words.", add_special_tokens=False)["input_ids"]
    contexts = [prompt + c for c in _contexts(tok, 8, seed=7)]        # _contexts' own head follows: longer shared
    backend = CachedHFBackend(model, tok)
    shared = min(len(os.path.commonprefix(contexts)), min(map(len, contexts)) - 1) // 16 * 16
    assert shared >= 32
    out = backend.generate(contexts, list(range(8)), False, cfg)
    assert backend.timing["prefill_tokens"] == sum(len(c) for c in contexts) - 7 * shared
    assert out == HFBackend(model, tok).generate(contexts, list(range(8)), False, cfg)


def _teacher_forced(model, ids: list[int], prefix: int, whole: bool, fast: bool) -> torch.Tensor:
    """Logits after a prefill of ids[:prefix] then one decode step per remaining token, through a BatchCache."""
    import contextlib

    from rag_dpo.agent import cpu_attention
    c = model.config
    dtype = next(model.parameters()).dtype
    cache = kv_cache.BatchCache(c.num_hidden_layers, 1, c.num_key_value_heads, len(ids) + 7, c.head_dim, dtype, "cpu")
    cache.whole = whole
    out = []
    with torch.inference_mode(), cpu_attention.using(model) if fast else contextlib.nullcontext():
        for lo, hi in [(0, prefix)] + [(i, i + 1) for i in range(prefix, len(ids))]:
            cache.valid[0, lo:hi] = True
            logits = model(input_ids=torch.tensor([ids[lo:hi]]), attention_mask=cache.mask(hi - lo, dtype),
                           position_ids=torch.arange(lo, hi)[None], past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits
            cache.length = hi
            out.append(logits[0, -1].float())
    return torch.stack(out)


def test_cpu_attention_equals_sdpa_in_bf16_and_is_used_only_there(tiny_model_and_tokenizer):
    """The engine's bf16 CPU attention (matmuls for a decode step, grouped-head SDPA for a prefill, every cache
    column read and the unwritten ones masked) gives SDPA's logits; float32 keeps SDPA and the exact old path."""
    from rag_dpo.agent import cpu_attention
    model, tok = tiny_model_and_tokenizer
    assert model.config.num_attention_heads != model.config.num_key_value_heads      # grouped heads exercised
    ids = tok("Which city is the capital of France? <search>capital of France</search> Paris is.")["input_ids"]
    ref32 = _teacher_forced(model, ids, 6, whole=False, fast=False)
    assert torch.allclose(_teacher_forced(model, ids, 6, whole=True, fast=False), ref32, atol=1e-5)   # masked columns
    assert not CachedHFBackend(model, tok).cpu_attention
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert CachedHFBackend(bf16, tok).cpu_attention
    sdpa16 = _teacher_forced(bf16, ids, 6, whole=False, fast=False)
    fast16 = _teacher_forced(bf16, ids, 6, whole=True, fast=True)
    assert model.config._attn_implementation != cpu_attention.NAME                    # restored after the block
    scale = float(ref32.abs().max())
    assert float((fast16 - ref32).abs().max()) <= 2 * float((sdpa16 - ref32).abs().max()) + 0.01 * scale
    assert float((fast16 - sdpa16).abs().max()) < 0.05 * scale
    with torch.enable_grad():      # training (gradients on) never takes the fast path
        q, k = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16), torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
        attn = bf16.model.layers[0].self_attn
        a, _ = cpu_attention.cpu_attention_forward(attn, q, k, k, torch.zeros(1, 1, 1, 5, dtype=torch.bfloat16))
        assert a.shape == (1, 1, 4, 16)


def test_shared_prefix_logits_equal_whole_encoding_and_encode_the_prefix_once(tiny_model_and_tokenizer):
    """Best-of-N scoring: N candidates after one long context. The shared context goes through the model once, the
    logits at each requested position equal encoding every sequence whole, across batches (the prefix's cache is
    copied per batch, since a forward appends to it) and at positions before a sequence's end (the PRM's)."""
    from rag_dpo.agent.kv_cache import shared_prefix_logits
    model, tok = tiny_model_and_tokenizer
    rng = random.Random(3)
    head = _contexts(tok, 1, seed=5)[0] + [rng.randrange(1000, 20000) for _ in range(60)]
    seqs = [head + [rng.randrange(1000, 20000) for _ in range(rng.randrange(2, 12))] for _ in range(5)]
    positions = [len(s) - 1 - (i % 2) for i, s in enumerate(seqs)]      # odd rows: the token before the last
    fed = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        shared = shared_prefix_logits(model, seqs, positions, tok.pad_token_id, batch_size=2)
        shared_fed = sum(fed)
        fed.clear()
        whole = shared_prefix_logits(model, seqs, positions, tok.pad_token_id, batch_size=2, share=False)
        whole_fed = sum(fed)
    finally:
        hook.remove()
    direct = torch.stack([model(input_ids=torch.tensor([s])).logits[0, p] for s, p in zip(seqs, positions)])
    assert torch.allclose(shared, direct.detach(), atol=1e-4) and torch.allclose(whole, direct.detach(), atol=1e-4)
    assert shared_fed < len(head) + 3 * 12 * 2 < whole_fed                # the head once, not five times
    one = shared_prefix_logits(model, seqs[:1], positions[:1], tok.pad_token_id)     # one sequence: nothing shared
    assert torch.allclose(one, direct[:1].detach(), atol=1e-4)
