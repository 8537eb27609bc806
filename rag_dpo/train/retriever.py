"""Generator feedback trains the retriever (issue 15): a usefulness signal from the policy, and three retrievers
trained on it -- a bi-encoder, a cross-encoder reranker, and an end-to-end soft top-k variant.

Usefulness (LM-supervised retrieval, REPLUG / Atlas). For a query and each candidate passage the policy scores
the gold answer: `ll_i = log p(answer | context + that passage)`, `ll_0` the same with an empty observation, and
`u_i = ll_i - ll_0` (how much the passage helps). The target over the candidates is the posterior
`softmax(u / T + prior_weight * cos0 / student_temperature)`, cos0 the untuned bi-encoder's similarity (its prior, in
the student's own units; EMDR2's posterior with a frozen prior); `prior_weight: 0` gives REPLUG's `softmax(u / T)`.
Why the prior: u scores one passage at a time, so a multi-hop question's bridge passage (supporting, without the
answer) looks as useless as a distractor (median u 0.07 vs -0.21; with the answer 8.2) and usefulness alone taught the
first run's retriever to demote it; with the prior, passages equally (un)useful keep the untuned order. The no-passage
score cancels in the softmax but is kept in the cache (a passage with u < 0 hurts the answer). The context is the
agent's own format (`agent.protocol.render_context`): the question, the chain so far, the search step, then the
candidate as the only retrieved passage, then `<think>..</think><answer>`; only the answer's tokens are scored. Queries
are the train questions and the search steps of real chains of the rollout pool (the query the agent actually sent,
with the steps before it as context), so the retriever learns the agent's query style. Candidates are the union of
the BM25 and the untuned dense top `candidates` (BM25's are the hard negatives). Scores are cached as JSONL, one
record per query, appended per batch, so a killed run continues; `cost.json` records passages scored per second.

Training (sentence-transformers' own trainers and losses):
- `dense`: the MiniLM bi-encoder, query side tuned. With `corpus_softmax` (the recipe) the KL runs over every passage
  of the corpus: the target is the posterior on the scored candidates and the untuned prior elsewhere
  (`corpus_target`), the passages' embeddings read from the frozen document side (`frozen_passage_table`); without
  it, `DistillKLDivLoss` (KL between the student's softmax over the candidates' similarities / `student_temperature`
  and the target).
- `rerank`: a `CrossEncoder` from the same MiniLM weights (new 1-logit head) with `ListNetLoss`, which is the cross
  entropy between the target softmax and the reranker's softmax over the candidates (the same KL up to a constant).
  It mean-pools the pair's tokens as the bi-encoder does, under a zero-initialised head trained at
  `rerank_head_learning_rate` (see RERANK_HEAD for why not BERT's [CLS] classifier).
- `e2e`: the generator's answer loss flows into the retriever: the candidates' similarities go through a soft,
  differentiable top-k (`soft_top_k`: sigmoid weights around a threshold that makes them sum to k) and the loss is the negative log of the
  answer likelihood marginalised over the softly selected passages, `-log sum_i w_i/k p(answer | passage_i)`
  (CLaRa's continuous bridge instead of a discrete pick). The generator is frozen, so `p(answer | passage_i)` for a
  fixed candidate set is exactly the cached `ll_i`; the gradient reaches the retriever only through `w`. What
  differs from `dense` is the objective: distillation matches the whole target distribution, e2e only asks that
  the top-k mass sit on passages that make the answer likely.

Every trained folder is a sentence-transformers folder (`dense:PATH` / `rerank:PATH` load it through
`rag_dpo.retrieval.build_retriever`) with a `training_manifest.json`; training refuses questions outside the train
split, so eval can refuse a retriever's training questions as it does a policy's.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from rag_dpo.errors import InputError
from rag_dpo.io import append_jsonl, atomic_write_json, iter_jsonl, repair_jsonl, stable_hash
from rag_dpo.records import SEARCH, Chain, Corpus, Question, Step

VARIANTS = ("dense", "rerank", "e2e")
# The first run's reranker was `CrossEncoder(MiniLM folder)`: BertForSequenceClassification, scoring the [CLS]
# token through BERT's pooler and a new random head. The bundled bi-encoder mean-pools and never trained [CLS] or the
# pooler: in 16 steps the head kept its init (weights' std 0.0207), ListNet stayed at log(6) (uniform) and the logits
# spread 0.02-0.07 per query, so BM25's top 20 came back in random order (recall@5 0.246 vs BM25's 0.731); a 20x
# larger head learning rate (1e-3) left it the same. The reranker now mean-pools the pair's tokens as the bi-encoder
# was trained to (`reranker_from_encoder`), and its head starts at zero: untrained, every score ties and the stable
# sort returns the first stage's order, so a reranker that learns nothing costs nothing (a random head shuffles).
RERANK_HEAD = r"((^|\.)2\.linear|classifier)\."   # the Dense scoring head (or a loaded cross-encoder's classifier)
DONE = "train_done.json"


@dataclass
class RetrieverSettings:
    """The `trainer` section of a `method: retriever` recipe."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))   # which retrievers to train
    candidates: int = 8                 # m: candidate passages per query (union of the BM25 and dense top m)
    questions: int | None = None        # train questions used as queries (None = all of the train split)
    step_queries: bool = True           # also the search steps of the rollout pool's chains
    pool: str | None = None             # chains file to take search steps from (None: the recipe rolls one out)
    passage_tokens: int = 64            # scored passage cut to this many tokens (as observations are)
    score_batch_size: int = 16          # (query, passage) rows per policy forward
    target_temperature: float = 1.0     # T of the target softmax(u / T + prior_weight * cos0 / student_temperature)
    prior_weight: float = 1.0           # 1: the posterior target (untuned retriever x usefulness), 0: usefulness alone
    corpus_softmax: bool = False        # dense: KL over the whole corpus (unscored passages keep their prior), not
                                        # over the m candidates alone; needs prior_weight > 0
    learning_rate: float = 3.0e-5       # bi-encoder (and e2e unless e2e_learning_rate is set)
    e2e_learning_rate: float | None = None
    rerank_learning_rate: float = 5.0e-5
    rerank_head_learning_rate: float = 1.0e-3   # the new scoring head (RERANK_HEAD); set it to
                                               # rerank_learning_rate when starting from a trained cross-encoder
    rerank_epochs: float = 1.0          # the cross-encoder reads every (query, passage) pair: ~4x a bi-encoder step
    rerank_max_length: int = 128        # tokens of a (query, passage) pair for the cross-encoder
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 8
    student_temperature: float = 0.05   # cosine similarities / this = the bi-encoder's logits over candidates
    max_seq_length: int = 128           # passage tokens the encoders see (also the untuned baseline's, for fairness)
    e2e_k: int = 3                      # soft top-k of the end-to-end variant (the agent's k)
    rerank_depth: int = 20              # BM25 passages the reranker reorders at search time
    logging_steps: int = 5
    save_steps: int = 50                # trainer checkpoints (resume)
    seed: int = 0
    transfer: str | None = "data/musique/hipporag_musique_train_100.json"   # recall on another data set too
    transfer_corpus: str | None = "data/musique/hipporag_musique_train_100_corpus.json"
    agent_eval: bool = True             # the agent with each retriever on eval.limit eval-split questions

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise InputError(f"unknown retriever variant {bad[0]!r} (choose from {', '.join(VARIANTS)})",
                             field="trainer.variants")
        if self.candidates < 2:
            raise InputError("a distribution over candidates needs at least 2", field="trainer.candidates")
        if self.corpus_softmax and not self.prior_weight:
            raise InputError("corpus_softmax spreads the untuned prior over the corpus; it needs prior_weight > 0",
                             field="trainer.corpus_softmax")


# ---- queries ----------------------------------------------------------------------------------------------------

@dataclass
class ScoringQuery:
    """One query to score candidates for: the retriever query, and the agent context it was sent from."""
    key: str
    question_id: str
    question: str
    query: str
    answer: str
    source: str                          # "question" | "step"
    prefix: list[Step] = field(default_factory=list)   # steps before the search (with their observations)
    step_text: str = ""                  # the search step's own text


def check_train_split(question_ids: Iterable[str], fractions=None, split: str = "train") -> None:
    """Training a retriever on questions outside the train split would leak them into eval: refuse."""
    from rag_dpo.data import assign_split
    bad = [q for q in question_ids if assign_split(q, fractions) != split]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise InputError(f"{len(bad)} question(s) are not in the {split} split (first: {shown}); a retriever trains "
                         f"on {split} questions only", field="question_ids")


def question_queries(questions: Sequence[Question]) -> list[ScoringQuery]:
    """The question text itself as the query, with a search step that sends it."""
    from rag_dpo.agent.protocol import format_step
    out = []
    for q in questions:
        if not q.answers:
            continue
        out.append(ScoringQuery(key=stable_hash(["q", q.id]), question_id=q.id, question=q.question,
                                query=q.question, answer=q.answers[0], source="question",
                                step_text=format_step("I need to search for the question.", SEARCH, q.question)))
    return out


def step_queries(chains: Sequence[Chain], questions: dict[str, Question]) -> list[ScoringQuery]:
    """Every search step on the selected path of each chain, with the steps before it (deduplicated per question)."""
    out, seen = [], set()
    for c in chains:
        q = questions.get(c.question_id)
        if q is None or not q.answers:
            continue
        path = c.path()
        for i, s in enumerate(path):
            if s.action != SEARCH or not s.query:
                continue
            dedup = (c.question_id, " ".join(s.query.lower().split()))
            if dedup in seen:
                continue
            seen.add(dedup)
            out.append(ScoringQuery(key=stable_hash(["s", c.question_id, s.query, i]), question_id=c.question_id,
                                    question=c.question, query=s.query, answer=q.answers[0], source="step",
                                    prefix=list(path[:i]), step_text=s.text))
    return out


def candidate_lists(queries: Sequence[str], retrievers: Sequence, m: int) -> list[list[str]]:
    """Interleave the retrievers' top-m (BM25 first: its hits are the hard negatives), deduplicated, m per query."""
    per = [r.search(list(queries), m) for r in retrievers]
    out = []
    for i in range(len(queries)):
        ids: list[str] = []
        for rank in range(m):
            for hits in per:
                row = hits[i]
                if rank < len(row) and row[rank][0] not in ids:
                    ids.append(row[rank][0])
        out.append(ids[:m])
    return out


# ---- usefulness scores ------------------------------------------------------------------------------------------

ANSWER_LEAD = "<think>The retrieved passages contain the answer.</think>\n<answer>"


def scoring_parts(tokenizer, q: ScoringQuery, passages: Sequence, passage_tokens: int
                  ) -> tuple[list[int], list[list[int]], list[int]]:
    """(shared prefix ids, one suffix per passage, answer ids): prefix = the agent context up to and including the
    search step; suffix = the observation holding that one passage (None = an empty observation) + the answer lead.
    Segments are tokenised separately, as `agent.protocol.tokenize_path` does."""
    from rag_dpo.agent.protocol import format_observation, render_context
    prefix = tokenizer(render_context(tokenizer, q.question, q.prefix) + q.step_text,
                       add_special_tokens=False)["input_ids"]
    lead = tokenizer(ANSWER_LEAD, add_special_tokens=False)["input_ids"]
    suffixes = [tokenizer(format_observation([] if p is None else [p], tokenizer, passage_tokens),
                          add_special_tokens=False)["input_ids"] + lead for p in passages]
    return prefix, suffixes, tokenizer(q.answer, add_special_tokens=False)["input_ids"]


def answer_loglik(model, prefix: list[int], suffixes: Sequence[list[int]], answer: list[int], pad_id: int,
                  batch_size: int = 16) -> list[float]:
    """log p(answer | prefix + suffix) summed over the answer's tokens, for each suffix. The prefix is encoded once
    and its KV cache shared by all suffixes (they are a query's candidates: same question, chain and search step),
    and the LM head runs only at the answer positions (a full-vocabulary softmax at every position cost more than
    the forward itself)."""
    import torch
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = next(model.parameters()).device
    out: list[float] = []
    tgt = torch.tensor(answer, device=device)
    # transformers >= 5.2x names the KV cache `cache` (argument and output); earlier ones `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    with torch.inference_mode():
        pre = decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        pre_cache = getattr(pre, cache_arg)
        for b in range(0, len(suffixes), batch_size):
            chunk = [list(x) + list(answer) for x in suffixes[b:b + batch_size]]
            n, width, plen = len(chunk), max(len(x) for x in chunk), len(prefix)
            cache = _repeat_cache(pre_cache, n)
            ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
            att = torch.zeros((n, plen + width), dtype=torch.long, device=device)
            att[:, :plen] = 1
            for j, x in enumerate(chunk):
                ids[j, :len(x)] = torch.tensor(x, device=device)
                att[j, plen:plen + len(x)] = 1
            pos = (plen + torch.arange(width, device=device)).unsqueeze(0).expand(n, -1)
            h = decoder(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True,
                        **{cache_arg: cache}).last_hidden_state
            for j, x in enumerate(chunk):
                start = len(x) - len(answer) - 1
                logp = torch.log_softmax(head(h[j, start:start + len(answer)]).float(), dim=-1)
                out.append(float(logp[torch.arange(len(answer), device=device), tgt].sum()))
    return out


def _repeat_cache(cache, n: int):
    """A copy of a batch-1 KV cache repeated n times along the batch (the prefix cache is reused per chunk)."""
    import copy
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(n)
    return c


def target_distribution(usefulness: Sequence[float], temperature: float = 1.0) -> list[float]:
    """softmax(u / T) over the candidates: the distribution the retriever is trained to match."""
    if not usefulness:
        return []
    z = [u / temperature for u in usefulness]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    s = sum(e)
    return [v / s for v in e]


def score_queries(queries: Sequence[ScoringQuery], candidates: Sequence[Sequence[str]], corpus: Corpus, model,
                  tokenizer, out_path: str | Path, passage_tokens: int = 64, batch_size: int = 16,
                  queries_per_batch: int = 4, progress: bool = True) -> Path:
    """Score every query's candidates (and the empty observation) with the policy; append one JSONL record per query
    to `out_path` (resumable: keys already there are skipped). Writes `<out>.cost.json` (passages scored per s)."""
    from tqdm.auto import tqdm
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl(out_path)
    done = {rec["key"] for _, rec in iter_jsonl(out_path)} if out_path.exists() else set()
    cost_path = out_path.with_suffix(".cost.json")
    cost = json.loads(cost_path.read_text()) if cost_path.exists() and done else {
        "queries": 0, "passages_scored": 0, "forward_rows": 0, "tokens": 0, "seconds": 0.0}
    todo = [(q, c) for q, c in zip(queries, candidates) if q.key not in done and c]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tqdm(total=len(queries), initial=len(queries) - len(todo), desc="usefulness scores", unit="query",
              disable=not progress) as bar:
        for b in range(0, len(todo), queries_per_batch):
            chunk = todo[b:b + queries_per_batch]
            t0 = time.perf_counter()
            lls, tokens = [], 0
            for q, cands in chunk:
                prefix, suffixes, answer = scoring_parts(tokenizer, q, [None] + [corpus[pid] for pid in cands],
                                                         passage_tokens)
                lls.append(answer_loglik(model, prefix, suffixes, answer, pad, batch_size))
                tokens += len(prefix) + sum(len(x) + len(answer) for x in suffixes)
            seconds = time.perf_counter() - t0
            records = []
            for (q, cands), ll in zip(chunk, lls):
                none, scores = ll[0], ll[1:]
                records.append({"key": q.key, "question_id": q.question_id, "source": q.source, "query": q.query,
                                "answer": q.answer, "candidates": list(cands), "ll": scores, "ll_none": none,
                                "usefulness": [x - none for x in scores]})
            append_jsonl(out_path, records)
            cost["queries"] += len(chunk)
            cost["passages_scored"] += sum(len(c) for _, c in chunk)
            cost["forward_rows"] += sum(len(c) + 1 for _, c in chunk)
            cost["tokens"] += tokens
            cost["seconds"] += seconds
            cost["passages_per_s"] = cost["passages_scored"] / cost["seconds"] if cost["seconds"] else 0.0
            cost["rows_per_s"] = cost["forward_rows"] / cost["seconds"] if cost["seconds"] else 0.0
            cost["tokens_per_s"] = cost["tokens"] / cost["seconds"] if cost["seconds"] else 0.0
            cost["batch_size"] = batch_size
            atomic_write_json(cost_path, cost)
            bar.update(len(chunk))
    return out_path


def read_scores(path: str | Path) -> list[dict]:
    """The cached usefulness records (errors name file and line)."""
    out = []
    for line, rec in iter_jsonl(path):
        for key in ("key", "question_id", "query", "candidates", "ll", "usefulness"):
            if key not in rec:
                raise InputError("missing field", file=str(path), line=line, field=key)
        if len(rec["candidates"]) != len(rec["usefulness"]):
            raise InputError("candidates and usefulness differ in length", file=str(path), line=line,
                             field="usefulness")
        out.append(rec)
    return out


# ---- soft top-k and the end-to-end loss -------------------------------------------------------------------------

def soft_top_k(scores, k: int, iterations: int = 40):
    """Differentiable top-k weights w_i = sigmoid(s_i - t), the threshold t set so that sum_i w_i = k (bisection):
    each w_i is in (0, 1), they sum to k, and w tends to the hard top-k indicator as the scores spread. t depends on
    the scores; its gradient comes from the implicit function theorem (dt/ds_i = w_i(1-w_i) / sum_j w_j(1-w_j)),
    so raising one passage's score takes weight from the others, as a top-k pick does."""
    import torch
    m = scores.shape[-1]
    if k >= m:
        return torch.ones_like(scores)
    with torch.no_grad():
        s = scores.detach()
        lo = s.min(-1, keepdim=True).values - 30.0
        hi = s.max(-1, keepdim=True).values + 30.0
        for _ in range(iterations):
            mid = (lo + hi) / 2
            over = torch.sigmoid(s - mid).sum(-1, keepdim=True) > k
            lo = torch.where(over, mid, lo)
            hi = torch.where(over, hi, mid)
        t0 = (lo + hi) / 2
        w0 = torch.sigmoid(s - t0)
        d = w0 * (1 - w0)
        c = d / d.sum(-1, keepdim=True).clamp_min(1e-12)
    t = t0 + (c * (scores - scores.detach())).sum(-1, keepdim=True)
    return torch.sigmoid(scores - t)


def soft_top_k_answer_loss(scores, answer_ll, k: int):
    """-log sum_i (w_i / k) p(answer | passage_i), w = soft_top_k(scores): the generator's answer loss as a function
    of the retriever's scores (batch x candidates)."""
    import torch
    w = soft_top_k(scores, k)
    log_mix = torch.logsumexp(answer_ll + torch.log(w / k + 1e-12), dim=-1)
    return -log_mix.mean()


def frozen_passage_table(records: Sequence[dict], corpus: Corpus, m: int, model, index=None,
                         whole_corpus: bool = False) -> dict:
    """What the query-side losses read instead of encoding passages at every step (the document side is frozen, so
    a passage's embedding never changes): `passages` (P x d, normalised) and per record its first m candidates' rows
    in it, their usefulness, answer log-likelihoods, and the untuned query embedding `query0` (the prior). The
    passages are the corpus `index`'s embeddings when it is given (the untuned index the recipe already has: no
    encoding), else the frozen side's encoding of every corpus passage (`whole_corpus`) or of the distinct candidates."""
    import numpy as np
    import torch

    from rag_dpo.retrieval.base import index_text

    def encode_document(texts):
        return np.asarray(model.encode_document(texts, normalize_embeddings=True, convert_to_numpy=True,
                                                show_progress_bar=False), dtype=np.float32)
    if index is not None:      # only if the index is this model's document side (checked on a few passages)
        from rag_dpo.retrieval.trained import document_side_reproduces
        probe = list(range(0, len(index.ids), max(1, len(index.ids) // 4)))[:4]
        if not document_side_reproduces(model, [corpus[index.ids[i]] for i in probe],
                                        np.asarray(index.embeddings)[probe]):
            index = None
    if index is not None:
        ids, emb = list(index.ids), np.asarray(index.embeddings, dtype=np.float32)
        query0 = np.asarray(index.encode_queries([r["query"] for r in records]), dtype=np.float32)
    else:
        ids = [p.id for p in corpus] if whole_corpus else \
            list(dict.fromkeys(pid for r in records for pid in r["candidates"][:m]))
        emb = encode_document([index_text(corpus[pid]) for pid in ids])
        query0 = encode_document([r["query"] for r in records])     # the untuned query side is the frozen one
    row = {pid: i for i, pid in enumerate(ids)}
    return {"candidates": torch.tensor([[row[p] for p in r["candidates"][:m]] for r in records]),
            "usefulness": torch.tensor([r["usefulness"][:m] for r in records], dtype=torch.float32),
            "ll": torch.tensor([r["ll"][:m] for r in records], dtype=torch.float32),
            "query0": torch.from_numpy(query0), "passages": torch.from_numpy(emb)}


def corpus_target(query0, candidates, usefulness, corpus, temperature: float, prior_weight: float,
                  student_temperature: float):
    """The posterior over the whole corpus: softmax(prior_weight * cos0 / student_temperature + u / T), u = 0 for
    passages that were not scored (taken as neither helping nor hurting). On the candidates it is the candidate
    target's logits; elsewhere the untuned order."""
    import torch
    logits = prior_weight * (query0 @ corpus.T) / student_temperature
    logits = logits.scatter_add(1, candidates, usefulness / temperature)
    return torch.softmax(logits, -1)


def _frozen_side_loss(model, table: dict, cfg: RetrieverSettings, objective: str):
    import torch

    class FrozenSideLoss(torch.nn.Module):
        """sentence-transformers loss over (query, label = the record's row in `table`): only the query is encoded;
        the passages' embeddings come from the frozen document side (`frozen_passage_table`), which is exact.
        objective `corpus_kl`: KL(corpus_target || softmax(cos(q, every passage) / student_temperature)). Why the
        whole corpus: a KL over the 6 candidates alone is blind to the other passages, and the query embedding
        drifted towards non-candidates (first run: train-question recall@5 0.703 -> 0.521); here every passage's
        score is in the loss. objective `e2e`: the soft top-k answer loss over the candidates' cos / temperature."""

        def __init__(self):
            super().__init__()
            self.model = model
            for name, value in table.items():
                self.register_buffer(name, value, persistent=False)

        def forward(self, sentence_features, labels):
            rows = labels.long().to(self.candidates.device)
            q = torch.nn.functional.normalize(self.model(sentence_features[0])["sentence_embedding"], dim=-1)
            if objective == "e2e":
                scores = torch.einsum("bd,bmd->bm", q, self.passages[self.candidates[rows]]) / cfg.student_temperature
                return soft_top_k_answer_loss(scores, self.ll[rows], cfg.e2e_k)
            target = corpus_target(self.query0[rows], self.candidates[rows], self.usefulness[rows], self.passages,
                                   cfg.target_temperature, cfg.prior_weight, cfg.student_temperature)
            student = torch.log_softmax((q @ self.passages.T) / cfg.student_temperature, -1)
            return torch.nn.functional.kl_div(student, target, reduction="batchmean")

    return FrozenSideLoss()


def _residual_listnet(model):
    import torch

    class ResidualListNetLoss(torch.nn.Module):
        """ListNet over prior + cross-encoder logit: per query the labels are [target logits..., prior logits...];
        the cross-entropy between softmax(target) and softmax(prior + logits). With the posterior target (prior + u)
        the cross-encoder learns the usefulness residual. (sentence-transformers' ListNetLoss has no fixed offset.)"""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, inputs, labels, prompt=None, task=None):
            from sentence_transformers.util import batch_to_device
            queries, docs_list = inputs
            pairs = [(q, d) for q, docs in zip(queries, docs_list) for d in docs]
            tokens = batch_to_device(self.model.preprocess(pairs), self.model.device)
            logits = self.model(tokens)["scores"].view(-1).float()
            loss, i = logits.new_zeros(()), 0
            for docs, lab in zip(docs_list, labels):
                n = len(docs)
                lab = torch.as_tensor(lab, dtype=torch.float32, device=logits.device)
                student = lab[n:] + logits[i:i + n]
                loss = loss - (torch.softmax(lab[:n], -1) * torch.log_softmax(student, -1)).sum()
                i += n
            return loss / len(docs_list)

    return ResidualListNetLoss()


# ---- training ---------------------------------------------------------------------------------------------------

def prior_similarities(records: Sequence[dict], corpus: Corpus, encoder=None, retriever=None) -> list[list[float]]:
    """cos(query, candidate) under the untuned bi-encoder for every record: the prior of the posterior target.
    `retriever` (a DenseRetriever with its corpus index) looks the passages up; else `encoder` encodes the distinct
    candidates once."""
    import numpy as np
    queries = [r["query"] for r in records]
    if retriever is not None:
        q = retriever.encode_queries(queries)
        row = {pid: i for i, pid in enumerate(retriever.ids)}
        return [[float(q[j] @ retriever.embeddings[row[pid]]) for pid in r["candidates"]]
                for j, r in enumerate(records)]
    from rag_dpo.retrieval.base import index_text
    pids = list(dict.fromkeys(pid for r in records for pid in r["candidates"]))
    q = np.asarray(encoder.encode_query(queries, normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False))
    d = np.asarray(encoder.encode_document([index_text(corpus[p]) for p in pids], normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False))
    row = {pid: i for i, pid in enumerate(pids)}
    return [[float(q[j] @ d[row[pid]]) for pid in r["candidates"]] for j, r in enumerate(records)]


def first_stage_lists(records: Sequence[dict], first_stage, depth: int) -> list[dict]:
    """The reranker's training lists: each record's scored candidates, then the rest of the first stage's top `depth`
    for its query -- the passages the reranker reorders at search time -- unscored, at usefulness 0 (taken as neither
    helping nor hurting; scored passages without the answer have median u -0.21). Why: a reranker trained on the 6
    scored candidates alone reordered BM25's top 6 about as BM25 does (recall@5 on its own training questions 0.682
    vs 0.693) but its top 20 far worse (0.432): passages from ranks 7-20, unlike anything it was trained on, rose to
    the top. A record's `prior` is dropped (it covers the scored candidates only; recompute it)."""
    hits = first_stage.search([r["query"] for r in records], depth)
    out = []
    for r, h in zip(records, hits):
        have = set(r["candidates"])
        extra = [pid for pid, _ in h if pid not in have]
        rec = {k: v for k, v in r.items() if k != "prior"}
        rec.update(candidates=list(r["candidates"]) + extra, usefulness=list(r["usefulness"]) + [0.0] * len(extra),
                   ll=list(r["ll"]) + [r.get("ll_none", 0.0)] * len(extra), unscored=len(extra))
        out.append(rec)
    return out


def target_logits(record: dict, temperature: float, prior_weight: float = 0.0, student_temperature: float = 1.0,
                  m: int | None = None) -> list[float]:
    """u/T + prior_weight * prior/student_temperature for the record's first m candidates (all when m is None)."""
    u = record["usefulness"][:m]
    prior = record["prior"][:m] if prior_weight else [0.0] * len(u)
    return [x / temperature + prior_weight * c / student_temperature for x, c in zip(u, prior)]


def training_rows(records: Sequence[dict], corpus: Corpus, m: int, temperature: float, value: str = "target",
                  prior_weight: float = 0.0, student_temperature: float = 1.0) -> dict[str, list]:
    """Columns for sentence-transformers: query, passage_0..passage_{m-1}, label (per candidate: the target logits
    u/T + prior_weight * prior/student_temperature for distillation -- `prior` being each record's untuned cosine
    similarities, see `prior_similarities` -- or the raw answer log-likelihoods for e2e). Queries with fewer than
    m candidates are left out (the losses need a fixed number of columns)."""
    from rag_dpo.retrieval.base import index_text
    cols: dict[str, list] = {"query": [], **{f"passage_{i}": [] for i in range(m)}, "label": []}
    for r in records:
        if len(r["candidates"]) < m:
            continue
        cols["query"].append(r["query"])
        for i, pid in enumerate(r["candidates"][:m]):
            cols[f"passage_{i}"].append(index_text(corpus[pid]))
        if value == "target":
            cols["label"].append(target_logits(r, temperature, prior_weight, student_temperature, m))
        else:
            cols["label"].append([float(x) for x in r["ll"][:m]])
    return cols


def query_tuned_encoder(base: str, max_seq_length: int):
    """A sentence-transformers Router: a trainable copy of the encoder for queries, the frozen original for
    documents. Why only the query side (as REPLUG's LSR does): the corpus embeddings stay those of the untuned
    model, so a trained retriever needs no re-indexing (a MiniLM encode of the 4,858-passage corpus costs minutes
    on 2 CPU cores), and the training backward pass skips the m passages."""
    import copy

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Router

    from rag_dpo.retrieval.dense import load_encoder
    enc = load_encoder(base, max_seq_length=max_seq_length, device="cpu" if not _cuda() else None)
    document = list(enc)
    for mod in document:
        for p in mod.parameters():
            p.requires_grad_(False)
    query = [copy.deepcopy(mod) for mod in document]
    for mod in query:
        for p in mod.parameters():
            p.requires_grad_(True)
    return SentenceTransformer(modules=[Router.for_query_document(query, document)],
                               device=str(enc.device))


def _st_args(cfg: RetrieverSettings, ckpt: Path, learning_rate: float, cross: bool = False, **extra):
    import os
    if cross:
        from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments as Args
    else:
        from sentence_transformers import SentenceTransformerTrainingArguments as Args
    report = "none" if os.environ.get("WANDB_MODE") == "disabled" else "wandb"
    return Args(output_dir=str(ckpt), num_train_epochs=cfg.num_train_epochs, learning_rate=learning_rate,
                per_device_train_batch_size=cfg.per_device_train_batch_size, warmup_steps=0.1,
                logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=1, save_strategy="steps",
                seed=cfg.seed, report_to=report, logging_first_step=True, disable_tqdm=False,
                dataloader_num_workers=0, use_cpu=not _cuda(), **extra)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _last_checkpoint(ckpt: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint
    return get_last_checkpoint(str(ckpt)) if ckpt.is_dir() else None


def _finish(model_dir: Path, trainer, variant: str, question_ids: Sequence[str], data_files, fractions,
            rows: int, seconds: float) -> Path:
    from rag_dpo.data import write_manifest
    log = [e for e in trainer.state.log_history]
    atomic_write_json(model_dir / "train_log.json", log)
    write_manifest(model_dir, question_ids, data_files=data_files, fractions=fractions,
                   info={"stage": "retriever", "variant": variant})
    atomic_write_json(model_dir / DONE, {"variant": variant, "rows": rows, "seconds": round(seconds, 1),
                                         "steps": trainer.state.global_step})
    return model_dir


def train_retriever(variant: str, records: Sequence[dict], corpus: Corpus, cfg: RetrieverSettings,
                    out_dir: str | Path, base_model: str | None = None, fractions=None,
                    data_files: Sequence[str | Path] = (), first_stage=None, prior_retriever=None) -> Path:
    """Train one retriever variant (dense | rerank | e2e) on cached usefulness records; save it as a
    sentence-transformers folder in out_dir (+ training_manifest.json, train_log.json). Resumes from the last
    trainer checkpoint; a finished folder is returned as is. The reranker trains on `first_stage_lists` (first_stage:
    the retriever it reranks, default bm25s); priors missing from the records come from `prior_retriever` (a
    DenseRetriever over `corpus`) or else from encoding with the untuned encoder."""
    import datasets

    if variant not in VARIANTS:
        raise InputError(f"unknown retriever variant {variant!r} (choose from {', '.join(VARIANTS)})",
                         field="trainer.variants")
    out_dir = Path(out_dir)
    if (out_dir / DONE).exists():
        return out_dir
    question_ids = sorted({r["question_id"] for r in records})
    check_train_split(question_ids, fractions)
    m = cfg.candidates
    if variant == "rerank" and cfg.rerank_depth > m:
        if first_stage is None:
            from rag_dpo.retrieval import build_retriever
            first_stage = build_retriever("bm25s", corpus, show_progress=False)
        records = first_stage_lists(records, first_stage, cfg.rerank_depth)
    prior_encoder = prior_retriever.model_name if prior_retriever is not None else \
        (base_model if variant != "rerank" and base_model else "all-MiniLM-L6-v2")
    # e2e and the whole-corpus KL read what they need from `frozen_passage_table` (its query0 is the prior)
    frozen_side = variant == "e2e" or (variant == "dense" and cfg.corpus_softmax)
    rows = [r for r in records if len(r["candidates"]) >= m]
    if not rows:
        raise InputError(f"no scored query has {m} candidates to train on", field="trainer.candidates")
    if not frozen_side and cfg.prior_weight and any("prior" not in r for r in rows):
        if prior_retriever is not None:
            priors = prior_similarities(rows, corpus, retriever=prior_retriever)
        else:
            from rag_dpo.retrieval.dense import load_encoder
            priors = prior_similarities(rows, corpus, load_encoder(prior_encoder, max_seq_length=cfg.max_seq_length))
        rows = [{**r, "prior": p} for r, p in zip(rows, priors)]
    ckpt = out_dir.with_name(out_dir.name + ".checkpoints")
    t0 = time.perf_counter()
    if variant == "rerank":
        from sentence_transformers.cross_encoder import CrossEncoderTrainer
        from sentence_transformers.cross_encoder.losses import ListNetLoss

        model = reranker_from_encoder(base_model or "all-MiniLM-L6-v2", cfg.rerank_max_length)
        if getattr(model, "num_labels", 1) != 1:
            raise InputError("the reranker needs a 1-logit cross-encoder", field="model")
        from rag_dpo.retrieval.base import index_text
        weight = cfg.prior_weight / cfg.student_temperature      # the residual reranker's prior, in logit units
        labels = [target_logits(r, cfg.target_temperature, cfg.prior_weight, cfg.student_temperature)
                  + ([weight * c for c in r["prior"]] if weight else []) for r in rows]
        ds = datasets.Dataset.from_dict({"query": [r["query"] for r in rows],
                                         "docs": [[index_text(corpus[p]) for p in r["candidates"]] for r in rows],
                                         "labels": labels})
        loss = _residual_listnet(model) if weight else ListNetLoss(model)
        import re
        head = any(re.search(RERANK_HEAD, n) for n, _ in model.named_parameters())
        args = _st_args(cfg, ckpt, cfg.rerank_learning_rate, cross=True,
                        learning_rate_mapping={RERANK_HEAD: cfg.rerank_head_learning_rate} if head else None)
        args.num_train_epochs = cfg.rerank_epochs
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=ds, loss=loss)
    else:
        from sentence_transformers import SentenceTransformerTrainer
        from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss

        model = query_tuned_encoder(base_model or "all-MiniLM-L6-v2", cfg.max_seq_length)
        if frozen_side:          # passages from the frozen side, queries encoded
            table = frozen_passage_table(rows, corpus, m, model, index=prior_retriever,
                                         whole_corpus=variant == "dense")
            ds = datasets.Dataset.from_dict({"query": [r["query"] for r in rows], "label": list(range(len(rows)))})
            loss = _frozen_side_loss(model, table, cfg, "e2e" if variant == "e2e" else "corpus_kl")
            routes = {"query": "query"}
        else:
            ds = datasets.Dataset.from_dict(training_rows(rows, corpus, m, cfg.target_temperature, "target",
                                                          cfg.prior_weight, cfg.student_temperature))
            loss = DistillKLDivLoss(model, student_temperature=cfg.student_temperature, teacher_temperature=1.0)
            routes = {"query": "query", **{f"passage_{i}": "document" for i in range(m)}}
        lr = cfg.e2e_learning_rate if variant == "e2e" and cfg.e2e_learning_rate is not None else cfg.learning_rate
        args = _st_args(cfg, ckpt, lr, router_mapping=routes)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=loss)
    trainer.train(resume_from_checkpoint=_last_checkpoint(ckpt))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir)) if hasattr(model, "save") else model.save_pretrained(str(out_dir))
    if variant == "rerank" and cfg.prior_weight:
        from rag_dpo.retrieval.trained import write_prior
        write_prior(out_dir, prior_encoder, cfg.prior_weight / cfg.student_temperature)
    _finish(out_dir, trainer, variant, question_ids, data_files, fractions, len(ds), time.perf_counter() - t0)
    import shutil
    shutil.rmtree(ckpt, ignore_errors=True)
    return out_dir


def reranker_from_encoder(base: str, max_length: int):
    """A CrossEncoder for `base`: a saved CrossEncoder folder as it is; a sentence-transformers bi-encoder (the
    bundled MiniLM) as [its transformer, mean pooling, a 1-output Dense head initialised to zero]. Why not
    `CrossEncoder(bi-encoder folder)`: that scores [CLS] through BERT's pooler, which a mean-pooling bi-encoder never
    trained (see RERANK_HEAD)."""
    import json

    from rag_dpo.retrieval.trained import load_cross_encoder
    path = Path(base) if base != "all-MiniLM-L6-v2" else Path(_bundled())
    conf = path / "config_sentence_transformers.json"
    if conf.is_file() and json.loads(conf.read_text(encoding="utf-8")).get("model_type") == "CrossEncoder":
        return load_cross_encoder(str(path), max_length=max_length)
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling
    if not (path / "config.json").is_file():
        raise InputError(f"cannot build a reranker from {base!r}: not a model folder", field="model")
    transformer = Transformer(str(path), max_seq_length=max_length)
    dim = transformer.get_embedding_dimension()
    head = Dense(dim, 1, activation_function=None, init_weight=torch.zeros(1, dim), init_bias=torch.zeros(1),
                 module_output_name="scores")
    return CrossEncoder(modules=[transformer, Pooling(dim, "mean"), head], device="cpu" if not _cuda() else None,
                        max_length=max_length)


def _bundled() -> str:
    """The bundled MiniLM folder (the reranker starts from its encoder weights with a new scoring head)."""
    from rag_dpo.retrieval.dense import bundled_model_path
    return str(bundled_model_path())


def save_untuned(out_dir: str | Path, max_seq_length: int) -> Path:
    """The bundled MiniLM saved as a folder with the same max_seq_length as the trained ones: the fair untuned
    baseline, and a `dense:PATH`/hybrid model every later stage can name."""
    from rag_dpo.retrieval.dense import load_encoder
    out_dir = Path(out_dir)
    if not (out_dir / "modules.json").exists():
        enc = load_encoder("all-MiniLM-L6-v2", max_seq_length=max_seq_length)
        enc.save(str(out_dir))
    return out_dir


def settings_dict(cfg: RetrieverSettings) -> dict:
    return dataclasses.asdict(cfg)
