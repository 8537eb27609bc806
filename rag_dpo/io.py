"""File helpers shared by every stage: atomic writes and append-whole-record JSONL, so a killed stage never
leaves a half-written file, and a rerun can count the finished records and continue."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from rag_dpo.errors import InputError


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600; a report should get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append whole records, one line each, flushed and fsynced together (a crash loses at most the last line,
    which read_jsonl(..., tolerate_torn_tail=True) drops)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: str | Path, tolerate_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record). Bad JSON is an InputError naming file and line; with tolerate_torn_tail, an
    unterminated last line (a write cut by a kill) is skipped, since resumable stages rewrite it."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=str(path))
    with open(path, "rb") as f:
        raw = f.readlines()
    lines = []
    for i, b in enumerate(raw, 1):
        try:
            lines.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"not UTF-8 text (byte 0x{b[e.start]:02x} at column {e.start + 1}); save the file as "
                             "UTF-8", file=str(path), line=i) from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and i == len(lines) and not line.endswith("\n"):
                return
            raise InputError(f"malformed JSON ({e.msg} at column {e.colno})", file=str(path), line=i) from None
        if not isinstance(obj, dict):
            raise InputError("expected a JSON object on each line", file=str(path), line=i)
        yield i, obj


def read_json_object(path: str | Path, missing: str = "file not found") -> dict:
    """A JSON file that must hold one object; a missing file, bad JSON or another type is one InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(missing, file=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg} at column {e.colno})", file=str(path), line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason}); save the file as UTF-8", file=str(path)) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", file=str(path))
    return data


def repair_jsonl(path: str | Path) -> None:
    """Drop a torn (unterminated) last line left by a killed writer, so appends start on a clean line."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:limit] if limit else h.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object, stable across runs and machines (used for cache keys and split assignment)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
