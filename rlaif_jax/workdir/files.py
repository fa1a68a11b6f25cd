"""Progress that survives a crash: JSONL files appended as work finishes, and atomic writes.

A record is flushed and fsynced as soon as it is appended, so a rerun reads everything that was
finished. A crash in the middle of a write leaves at most one torn last line, which `read_jsonl`
drops (and counts). Final files (predictions.json, results.json, results.md) are written to a
temporary file and renamed over the target, so readers never see half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """(records, number of unreadable lines) of a JSONL file; ([], 0) when it does not exist."""
    if not os.path.exists(path):
        return [], 0
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    return records, bad


class JsonlAppender:
    """Appends records to a JSONL file, each durable once `append` returns."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        # A torn last line from a crash would glue onto the next record: start on a new line.
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n")

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not lines:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                                         suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_write_json(path: str, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
