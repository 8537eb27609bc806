"""Passage ids and corpora: the union of a dataset's context paragraphs, or a corpus file of its own.

Passage ids are global and stable so that the same Wikipedia paragraph gets the same id whichever file it came
from: the id is the paragraph's title. When one corpus holds two different texts under the same title (MuSiQue
does this), every text of that title gets a short content-hash suffix, `Title#1a2b3c4d`, so the id still names the
title and never depends on the order the paragraphs were read in. A paragraph without a title gets `p-<hash>`.
Texts are compared after collapsing whitespace, so the same paragraph joined from its sentences slightly
differently by two sources is still one passage.

Corpus files (`load_corpus`): JSONL or a JSON list of `{id, title, text}` (id optional: derived as above),
FlashRAG's `{id, contents}` with `contents = "Title"\\ntext`, or HippoRAG's JSON dict `title -> [sentences]`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from rag_dpo.errors import InputError
from rag_dpo.io import iter_jsonl
from rag_dpo.records import Corpus, Passage, Question

HASH_CHARS = 8


def normalize_text(text: str) -> str:
    """Whitespace-collapsed text: the key under which two paragraphs count as the same passage."""
    return " ".join(text.split())


def content_hash(text: str, length: int = HASH_CHARS) -> str:
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:length]


def passage_id(title: str, text: str, shared_title: bool = False) -> str:
    """The id of a paragraph: its title, plus a content hash when its title has several texts in the corpus."""
    title = title.strip()
    if not title:
        return f"p-{content_hash(text, 12)}"
    return f"{title}#{content_hash(text)}" if shared_title else title


def join_sentences(sentences: Iterable[str]) -> str:
    """Join a paragraph's sentences: HotpotQA keeps each sentence's leading space, 2Wiki does not."""
    out = ""
    for s in sentences:
        s = str(s)
        if out and not out[-1].isspace() and s and not s[0].isspace():
            out += " "
        out += s
    return out.strip()


class CorpusBuilder:
    """Collects (title, text) paragraphs, dedupes identical ones, then assigns ids once all are known."""

    def __init__(self) -> None:
        self._order: list[tuple[str, str]] = []          # (title, normalized text) in first-seen order
        self._texts: dict[tuple[str, str], str] = {}       # key -> original text
        self._titles: dict[str, set[str]] = {}

    @staticmethod
    def key(title: str, text: str) -> tuple[str, str]:
        return title.strip(), normalize_text(text)

    def add(self, title: str, text: str) -> tuple[str, str]:
        key = self.key(title, text)
        if key not in self._texts:
            self._texts[key] = text.strip()
            self._order.append(key)
            self._titles.setdefault(key[0], set()).add(key[1])
        return key

    def __len__(self) -> int:
        return len(self._order)

    def ids(self) -> dict[tuple[str, str], str]:
        return {key: passage_id(key[0], key[1], len(self._titles[key[0]]) > 1) for key in self._order}

    def build(self, name: str = "") -> tuple[Corpus, dict[tuple[str, str], str]]:
        ids = self.ids()
        return Corpus((Passage(ids[k], k[0], self._texts[k]) for k in self._order), name=name), ids


def _split_contents(contents: str) -> tuple[str, str]:
    """FlashRAG corpus rows: `"Title"\\ntext`."""
    title, _, text = contents.partition("\n")
    title = title.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1]
    return title, text


def _passage_fields(obj: dict, file: str, where: dict) -> tuple[str | None, str, str]:
    pid = obj.get("id", obj.get("_id", obj.get("idx")))
    if "text" in obj or "paragraph_text" in obj:
        text = obj.get("text", obj.get("paragraph_text"))
        title = obj.get("title", "") or ""
    elif "contents" in obj:
        if not isinstance(obj["contents"], str):
            raise InputError("expected a string", file=file, field="contents", **where)
        title, text = _split_contents(obj["contents"])
    else:
        raise InputError("passage has no 'text' (or FlashRAG 'contents')", file=file, field="text", **where)
    if isinstance(text, list):
        text = join_sentences(text)
    if not isinstance(text, str):
        raise InputError(f"expected a string, got {type(text).__name__}", file=file, field="text", **where)
    if not isinstance(title, str):
        raise InputError(f"expected a string, got {type(title).__name__}", file=file, field="title", **where)
    return (None if pid is None else str(pid)), title, text


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg} at column {e.colno})", file=str(path), line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason})", file=str(path)) from None


def load_corpus(path: str | Path) -> Corpus:
    """Read a corpus file (see the module docstring for the accepted layouts). Passages keep the file's ids when
    it has them; otherwise ids are derived from titles. An empty corpus is an InputError."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise InputError("file not found", file=file)
    rows: list[tuple[dict, dict]] = []       # (object, location)
    if path.suffix == ".jsonl":
        rows = [(obj, {"line": i}) for i, obj in iter_jsonl(path)]
    elif path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            for title, value in data.items():
                if isinstance(value, list):
                    value = join_sentences(value)
                if not isinstance(value, str):
                    raise InputError("expected title -> list of sentences (or text)", file=file, field=str(title))
                rows.append(({"title": title, "text": value}, {"record": len(rows)}))
        elif isinstance(data, list):
            for i, obj in enumerate(data):
                if not isinstance(obj, dict):
                    raise InputError("expected a JSON object", file=file, record=i)
                rows.append((obj, {"record": i}))
        else:
            raise InputError("expected a JSON list of passages or a dict title -> sentences", file=file)
    else:
        raise InputError(f"unknown corpus file type '{path.suffix}' (expected .jsonl or .json)", file=file)

    builder = CorpusBuilder()
    given: list[tuple[str | None, tuple[str, str]]] = []
    for obj, where in rows:
        pid, title, text = _passage_fields(obj, file, where)
        given.append((pid, builder.add(title, text)))
    if not given:
        raise InputError("corpus is empty (no passages)", file=file)
    derived = builder.ids()
    passages, seen = [], {}
    for (pid, key), (_, where) in zip(given, rows):
        pid = pid if pid is not None else derived[key]
        if pid in seen:
            if seen[pid] != key:
                raise InputError(f"passage id '{pid}' is used for two different passages", file=file,
                                 field="id", **where)
            continue
        seen[pid] = key
        passages.append(Passage(pid, key[0], builder._texts[key]))
    return Corpus(passages, name=path.stem)


def align_to_corpus(questions: list[Question], corpus: Corpus, own: Corpus | None = None,
                    strict: bool = True, file: str | None = None,
                    locations: dict[str, dict] | None = None) -> tuple[list[Question], int, int]:
    """Map supporting ids onto `corpus`: kept when the id is there, else matched by (title, text) of the
    dataset's own passage, else by title when the corpus holds exactly one passage with that title.

    Returns (questions with remapped supporting_ids, resolved count, total count). With `strict`, the first id
    that does not resolve is an InputError naming the question's line/record and field `supporting_ids`."""
    by_content = {CorpusBuilder.key(p.title, p.text): p.id for p in corpus}
    by_title: dict[str, list[str]] = {}
    for p in corpus:
        by_title.setdefault(p.title.strip(), []).append(p.id)
    out, resolved, total = [], 0, 0
    for q in questions:
        ids = []
        for sid in q.supporting_ids:
            total += 1
            match = sid if sid in corpus else None
            src = own.get(sid) if own is not None else None
            if match is None and src is not None:
                match = by_content.get(CorpusBuilder.key(src.title, src.text))
                if match is None and len(by_title.get(src.title.strip(), [])) == 1:
                    match = by_title[src.title.strip()][0]
            if match is None:
                if strict:
                    where = (locations or {}).get(q.id, {})
                    raise InputError(f"question {q.id}: supporting passage '{sid}' is not in the corpus "
                                     f"'{corpus.name}'", file=file or q.source, field="supporting_ids", **where)
                ids.append(sid)
            else:
                resolved += 1
                ids.append(match)
        out.append(Question(**{**q.__dict__, "supporting_ids": ids}))
    return out, resolved, total
