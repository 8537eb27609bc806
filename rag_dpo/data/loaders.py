"""Load multi-hop QA files in their published formats into one schema: `Question`s plus the corpus made of the
union of the file's context paragraphs.

Each format has one record converter (a plain function from a record to the question's fields, its context
paragraphs and its supporting paragraphs); the converters are shared by local files (`load_dataset`) and hub
datasets (`rag_dpo.data.hub`). Passage ids can only be assigned once every paragraph of the file is known (a
title gets a hash suffix when it has two texts), so loading is two passes: convert all records, then build the
corpus and resolve each question's supporting paragraphs to ids.

The format is detected from the file extension and the first record's keys; `format=` overrides. Bad input is an
InputError naming the file, the line (JSONL/CSV, 1-based) or record index (JSON lists, 0-based) and the field.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from rag_dpo.data.corpus import CorpusBuilder, align_to_corpus, join_sentences, load_corpus, read_json
from rag_dpo.errors import InputError
from rag_dpo.io import iter_jsonl
from rag_dpo.records import Corpus, Question

_HOP_PREFIX = re.compile(r"^(\d+)hop")
_MUSIQUE_TYPE = re.compile(r"^(\d+hop\d*)__")


@dataclass
class Dataset:
    questions: list[Question]
    corpus: Corpus | None        # union of the file's context paragraphs; None when the file has none (Bamboogle)
    format: str
    path: str
    locations: dict[str, dict] = field(default_factory=dict)   # question id -> {"line": n} or {"record": i}

    def __len__(self) -> int:
        return len(self.questions)


@dataclass
class Converted:
    """One record, converted: the question (supporting ids filled in later), its context paragraphs and the
    (title, text) of its supporting paragraphs."""
    question: Question
    paragraphs: list[tuple[str, str]]
    supporting: list[tuple[str, str]]


class _Record:
    """A raw record plus where it came from, so every error names file, line/record and field."""

    def __init__(self, obj: dict, file: str, where: dict):
        self.obj, self.file, self.where = obj, file, where

    def error(self, message: str, field: str | None = None) -> InputError:
        return InputError(message, file=self.file, field=field, **self.where)

    def get(self, key: str, default: Any = None) -> Any:
        return self.obj.get(key, default)

    def require(self, key: str, types: type | tuple = object) -> Any:
        if key not in self.obj or self.obj[key] is None:
            raise self.error("missing required field", key)
        value = self.obj[key]
        if not isinstance(value, types):
            raise self.error(f"unexpected type {type(value).__name__}", key)
        return value

    def text(self, key: str) -> str:
        value = self.require(key)
        if not isinstance(value, (str, int, float)) or not str(value).strip():
            raise self.error("must be a non-empty string", key)
        return str(value).strip()


def _answers(values: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for v in values:
        s = str(v).strip() if v is not None else ""
        if s and s not in out:
            out.append(s)
    return out


def _hops_from_id(qid: str) -> int | None:
    m = _HOP_PREFIX.match(qid)
    return int(m.group(1)) if m else None


def _musique_type(qid: str) -> str | None:
    """MuSiQue's composition shape from its id prefix (`2hop`, `3hop1`, `4hop3`, ...)."""
    m = _MUSIQUE_TYPE.match(qid)
    return m.group(1) if m else None


def _context_pairs(rec: _Record, key: str) -> list[tuple[str, str]]:
    """(title, text) of a HotpotQA/2Wiki context: `[[title, [sentences]]]` (original files), `{title: [...],
    sentences: [[...]]}` (hub datasets) or `[{title, sentences|text}]`."""
    ctx = rec.require(key, (list, dict))
    if isinstance(ctx, dict):
        titles, sents = ctx.get("title"), ctx.get("sentences")
        if not isinstance(titles, list) or not isinstance(sents, list) or len(titles) != len(sents):
            raise rec.error("expected {title: [...], sentences: [[...]]} of equal lengths", key)
        ctx = list(zip(titles, sents))
    out = []
    for j, item in enumerate(ctx):
        if isinstance(item, dict):
            item = (item.get("title"), item.get("sentences", item.get("text", item.get("paragraph_text"))))
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
            raise rec.error(f"entry {j}: expected [title, [sentences]]", key)
        title, body = item
        text = join_sentences(body) if isinstance(body, list) else body
        if not isinstance(text, str):
            raise rec.error(f"entry {j}: expected sentences or text", key)
        out.append((title, text))
    return out


def _supporting_titles(rec: _Record, key: str = "supporting_facts", container: dict | None = None) -> list[str]:
    facts = (container if container is not None else rec.obj).get(key)
    if facts is None:
        return []
    if isinstance(facts, dict):
        facts = facts.get("title") or []
        return [str(t) for t in facts]
    titles = []
    for j, f in enumerate(facts):
        if isinstance(f, (list, tuple)) and f and isinstance(f[0], str):
            titles.append(f[0])
        elif isinstance(f, str):
            titles.append(f)
        else:
            raise rec.error(f"entry {j}: expected [title, sentence_id]", key)
    return titles


def _supporting_from_titles(rec: _Record, paragraphs: list[tuple[str, str]], titles: list[str],
                            key: str = "supporting_facts") -> list[tuple[str, str]]:
    by_title: dict[str, tuple[str, str]] = {}
    for p in paragraphs:
        by_title.setdefault(p[0], p)
    out = []
    for t in dict.fromkeys(titles):
        if t not in by_title:
            raise rec.error(f"supporting title '{t}' is not among the record's context paragraphs", key)
        out.append(by_title[t])
    return out


def _flagged_paragraphs(rec: _Record, key: str, text_key: str = "paragraph_text"
                        ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """MuSiQue `paragraphs` / IRCoT `contexts`: [{title, paragraph_text, is_supporting}]."""
    paras, support = [], []
    for j, p in enumerate(rec.require(key, list)):
        if not isinstance(p, dict):
            raise rec.error(f"entry {j}: expected an object", key)
        text = p.get(text_key, p.get("text"))
        if not isinstance(text, str):
            raise rec.error(f"entry {j}: missing '{text_key}'", key)
        pair = (str(p.get("title") or ""), text)
        paras.append(pair)
        if p.get("is_supporting"):
            support.append(pair)
    return paras, support


# ---- per-format record converters -------------------------------------------------------------------------

def convert_hotpotqa(rec: _Record) -> Converted:
    """HotpotQA original (and 2WikiMultiHopQA, same layout): _id, question, answer, type, supporting_facts
    [[title, sent_id]], context [[title, [sentences]]]. Hops = number of distinct supporting titles."""
    qid = rec.text("_id" if "_id" in rec.obj else "id")
    paragraphs = _context_pairs(rec, "context")
    titles = _supporting_titles(rec)
    supporting = _supporting_from_titles(rec, paragraphs, titles)
    q = Question(id=qid, question=rec.text("question"), answers=_answers([rec.text("answer")]),
                 hops=len(set(titles)) or None, type=rec.get("type"), source=rec.file)
    return Converted(q, paragraphs, supporting)


def convert_2wiki(rec: _Record) -> Converted:
    """2WikiMultiHopQA original: as HotpotQA plus evidences [[subject, relation, object]] and type
    (comparison / inference / compositional / bridge_comparison)."""
    return convert_hotpotqa(rec)


def convert_musique(rec: _Record) -> Converted:
    """MuSiQue original: id, question, paragraphs [{idx, title, paragraph_text, is_supporting}],
    question_decomposition, answer, answer_aliases, answerable. Unanswerable questions (MuSiQue-Full) are kept
    with answerable=False and no answers. Hops = decomposition length (else the id prefix `2hop__`)."""
    qid = rec.text("id")
    answerable = rec.get("answerable", True) is not False
    paragraphs, supporting = _flagged_paragraphs(rec, "paragraphs")
    decomposition = rec.get("question_decomposition")
    hops = len(decomposition) if isinstance(decomposition, list) and decomposition else _hops_from_id(qid)
    if answerable:
        answers = _answers([rec.text("answer"), *(rec.get("answer_aliases") or [])])
    else:
        answers = []
    q = Question(id=qid, question=rec.text("question"), answers=answers, hops=hops,
                 type=_musique_type(qid), answerable=answerable, source=rec.file)
    return Converted(q, paragraphs, supporting)


def _ircot_answers(rec: _Record) -> list[str]:
    values: list[Any] = []
    for j, obj in enumerate(rec.require("answers_objects", list)):
        if not isinstance(obj, dict):
            raise rec.error(f"entry {j}: expected an object", "answers_objects")
        if obj.get("spans"):
            values.extend(obj["spans"])
        elif str(obj.get("number", "")).strip():
            values.append(obj["number"])
        elif isinstance(obj.get("date"), dict) and any(str(v).strip() for v in obj["date"].values()):
            d = obj["date"]
            values.append(" ".join(str(d.get(k, "")).strip() for k in ("day", "month", "year") if str(d.get(k, "")).strip()))
    answers = _answers(values)
    if not answers:
        raise rec.error("no answer (spans/number/date all empty)", "answers_objects")
    return answers


def convert_ircot(rec: _Record) -> Converted:
    """IRCoT processed: question_id, question_text, answers_objects[{spans, number, date}],
    contexts [{id, title, paragraph_text, is_supporting}]. Hops (and type) from the id prefix for MuSiQue ids,
    else hops = the number of supporting titles."""
    qid = rec.text("question_id")
    paragraphs, supporting = _flagged_paragraphs(rec, "contexts")
    hops = _hops_from_id(qid) or (len({t for t, _ in supporting}) or None)
    q = Question(id=qid, question=rec.text("question_text"), answers=_ircot_answers(rec), hops=hops,
                 type=_musique_type(qid), source=rec.file)
    return Converted(q, paragraphs, supporting)


def convert_flashrag(rec: _Record) -> Converted:
    """FlashRAG jsonl: id, question, golden_answers, optional metadata (type, and HotpotQA-style context /
    supporting_facts or MuSiQue-style paragraphs when present)."""
    qid = rec.text("id")
    golden = rec.require("golden_answers")
    answers = _answers(golden if isinstance(golden, list) else [golden])
    if not answers:
        raise rec.error("no answer", "golden_answers")
    meta = rec.get("metadata") or {}
    if not isinstance(meta, dict):
        raise rec.error("expected an object", "metadata")
    paragraphs: list[tuple[str, str]] = []
    supporting: list[tuple[str, str]] = []
    hops = _hops_from_id(qid)
    if meta.get("context") is not None:
        inner = _Record(meta, rec.file, rec.where)
        paragraphs = _context_pairs(inner, "context")
        titles = _supporting_titles(inner, container=meta)
        supporting = _supporting_from_titles(inner, paragraphs, titles)
        hops = hops or len(set(titles)) or None
    elif isinstance(meta.get("paragraphs"), list):
        paragraphs, supporting = _flagged_paragraphs(_Record(meta, rec.file, rec.where), "paragraphs")
        decomposition = meta.get("question_decomposition")
        hops = hops or (len(decomposition) if isinstance(decomposition, list) and decomposition else None)
    q = Question(id=qid, question=rec.text("question"), answers=answers, hops=hops,
                 type=meta.get("type"), source=rec.file)
    return Converted(q, paragraphs, supporting)


def convert_bamboogle(rec: _Record) -> Converted:
    """Bamboogle JSON (Search-o1): id, Question, answer (list or string). No passages."""
    answer = rec.require("answer")
    answers = _answers(answer if isinstance(answer, list) else [answer])
    if not answers:
        raise rec.error("no answer", "answer")
    q = Question(id=rec.text("id"), question=rec.text("Question"), answers=answers, hops=2, source=rec.file)
    return Converted(q, [], [])


FORMATS: dict[str, Callable[[_Record], Converted]] = {
    "hotpotqa": convert_hotpotqa,
    "2wikimultihopqa": convert_2wiki,
    "musique": convert_musique,
    "ircot": convert_ircot,
    "flashrag": convert_flashrag,
    "bamboogle": convert_bamboogle,
    "bamboogle_csv": convert_bamboogle,      # CSV rows are mapped to {id, Question, answer} by _csv_rows
}
FORMAT_ALIASES = {"2wiki": "2wikimultihopqa", "hotpot": "hotpotqa", "bamboogle_json": "bamboogle"}


def detect_format(first: dict) -> str | None:
    """The format a record's keys identify, or None."""
    keys = set(first)
    if "contexts" in keys and "question_text" in keys:
        return "ircot"
    if "paragraphs" in keys and ("question_decomposition" in keys or "answerable" in keys):
        return "musique"
    if "golden_answers" in keys:
        return "flashrag"
    if "context" in keys and "question" in keys:
        return "2wikimultihopqa" if ("evidences" in keys or "entity_ids" in keys) else "hotpotqa"
    if "Question" in keys and "answer" in keys:
        return "bamboogle"
    return None


def resolve_format(name: str, file: str | None = None) -> str:
    name = FORMAT_ALIASES.get(name.lower(), name.lower())
    if name not in FORMATS:
        raise InputError(f"unknown format '{name}' (known: {', '.join(sorted(FORMATS))})", file=file,
                         field="format")
    return name


# ---- reading files ----------------------------------------------------------------------------------------

def _csv_rows(path: Path) -> Iterator[_Record]:
    """Bamboogle CSV: with a header (Question, Answer[, id]) or headerless like the compositional-gap repo's file
    (column 0 the question, column 4 the answer, later non-empty columns extra aliases). Headerless rows get ids
    `test_<row>` (0-based), the ids Search-o1's Bamboogle JSON uses for the same rows."""
    file = str(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason})", file=file) from None
    except csv.Error as e:
        raise InputError(f"malformed CSV ({e})", file=file) from None
    if not rows:
        return
    header = [c.strip().lower() for c in rows[0]]
    if "question" in header:
        qi = header.index("question")
        if "answer" not in header:
            raise InputError("CSV header has no 'Answer' column", file=file, line=1, field="Answer")
        ai = header.index("answer")
        ii = header.index("id") if "id" in header else None
        for n, row in enumerate(rows[1:], start=2):
            if not any(c.strip() for c in row):
                continue
            get = lambda i: row[i].strip() if i is not None and i < len(row) else ""  # noqa: E731
            obj = {"id": get(ii) or f"row_{n - 2}", "Question": get(qi), "answer": [get(ai)] if get(ai) else []}
            yield _Record(obj, file, {"line": n})
        return
    for n, row in enumerate(rows, start=1):
        if not any(c.strip() for c in row):
            continue
        answers = [c.strip() for c in row[4:] if c.strip()] if len(row) > 4 else [c.strip() for c in row[1:2]]
        obj = {"id": f"test_{n - 1}", "Question": row[0].strip(), "answer": answers}
        yield _Record(obj, file, {"line": n})


def _records(path: Path) -> tuple[list[_Record], str]:
    """All records of a file plus the kind of container ('jsonl', 'json', 'csv')."""
    file = str(path)
    if path.suffix == ".csv":
        return list(_csv_rows(path)), "csv"
    if path.suffix == ".jsonl":
        return [_Record(obj, file, {"line": i}) for i, obj in iter_jsonl(path)], "jsonl"
    if path.suffix != ".json":
        raise InputError(f"unknown file type '{path.suffix}' (expected .json, .jsonl or .csv)", file=file)
    data = read_json(path)
    if isinstance(data, dict):
        if isinstance(data.get("data"), list):
            data = data["data"]
        elif data and all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()):
            raise InputError("this is a corpus (title -> sentences), not a question file; pass it as --corpus "
                             "(load_corpus)", file=file)
        else:
            raise InputError("expected a JSON list of question records", file=file)
    if not isinstance(data, list):
        raise InputError("expected a JSON list of question records", file=file)
    records = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise InputError("expected a JSON object", file=file, record=i)
        records.append(_Record(obj, file, {"record": i}))
    return records, "json"


def convert_records(records: Iterable[_Record], fmt: str, file: str, name: str = "") -> Dataset:
    """Run one format's converter over records, build the union corpus and fill supporting ids."""
    convert = FORMATS[fmt]
    converted: list[tuple[Converted, _Record]] = []
    builder = CorpusBuilder()
    seen: dict[str, _Record] = {}
    for rec in records:
        c = convert(rec)
        if c.question.id in seen:
            raise rec.error(f"duplicate question id '{c.question.id}' (first at "
                            f"{', '.join(f'{k} {v}' for k, v in seen[c.question.id].where.items())})")
        seen[c.question.id] = rec
        for title, text in c.paragraphs:
            builder.add(title, text)
        converted.append((c, rec))
    if not converted:
        raise InputError("no question records", file=file)
    corpus, ids = builder.build(name=name) if len(builder) else (None, {})
    if corpus is None and fmt not in ("bamboogle", "bamboogle_csv", "flashrag"):
        raise InputError("corpus is empty: no record has context paragraphs", file=file)
    questions = []
    for c, rec in converted:
        c.question.supporting_ids = [ids[CorpusBuilder.key(t, x)] for t, x in c.supporting]
        questions.append(c.question)
    return Dataset(questions, corpus, fmt, file, {c.question.id: rec.where for c, rec in converted})


def load_dataset(path: str | Path, format: str | None = None, corpus: str | Path | Corpus | None = None,
                 strict: bool = True) -> Dataset:
    """Load a question file in any supported format (see FORMATS); `format` overrides detection.

    With `corpus` (a corpus file or a Corpus), that corpus replaces the file's own union corpus and supporting
    ids are mapped onto it (`align_to_corpus`); with `strict`, one that does not resolve is an InputError."""
    dataset = _load_file(Path(path), format)
    if corpus is not None:
        if not isinstance(corpus, Corpus):
            corpus = load_corpus(corpus)
        dataset.questions, _, _ = align_to_corpus(dataset.questions, corpus, own=dataset.corpus, strict=strict,
                                                  file=dataset.path, locations=dataset.locations)
        dataset.corpus = corpus
    return dataset


def _load_file(path: Path, format: str | None) -> Dataset:
    file = str(path)
    if not path.exists():
        raise InputError("file not found", file=file)
    if path.is_dir():
        raise InputError("expected a file, got a directory", file=file)
    records, container = _records(path)
    if not records:
        raise InputError("no question records", file=file)
    if format is not None:
        fmt = resolve_format(format, file)
    elif container == "csv":
        fmt = "bamboogle_csv"
    else:
        fmt = detect_format(records[0].obj)
        if fmt is None:
            raise records[0].error(f"cannot detect the format from the keys {sorted(records[0].obj)}; pass "
                                   f"--format (one of {', '.join(sorted(FORMATS))})", "format")
    if fmt == "bamboogle_csv" and container != "csv":
        fmt = "bamboogle"
    return convert_records(records, fmt, file, name=path.stem)


def dataset_from_rows(rows: Iterable[dict], format: str | None = None, source: str = "rows") -> Dataset:
    """Convert in-memory records (e.g. rows of a `datasets.Dataset`) with the same converters as files."""
    records = [_Record(dict(r), source, {"record": i}) for i, r in enumerate(rows)]
    if not records:
        raise InputError("no question records", file=source)
    fmt = resolve_format(format, source) if format else detect_format(records[0].obj)
    if fmt is None:
        raise records[0].error(f"cannot detect the format from the keys {sorted(records[0].obj)}; pass a format "
                               f"(one of {', '.join(sorted(FORMATS))})", "format")
    return convert_records(records, fmt, source, name=source)
