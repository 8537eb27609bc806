"""One error type for bad input, so every stage reports the file, line and field the same way.

The CLI turns an InputError into a single message on stderr and exit code 2 (never a traceback).
"""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: names the file, the line (1-based) or record index, and the field at fault."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 field: str | None = None, record: int | None = None):
        self.message, self.file, self.line, self.field, self.record = message, file, line, field, record
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return (", ".join(where) + ": " if where else "") + self.message
