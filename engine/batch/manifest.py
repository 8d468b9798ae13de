"""The batch manifest: one JSON line per finished or failed job, safe under concurrent ranks.

Each rank appends to its own file, ``manifest.rank<k>.jsonl``, so every file has exactly one
writer: no two processes ever write the same file, on a local disk or on NFS, where ``O_APPEND``
is not atomic across machines. A record is one ``os.write`` of one whole line on a file opened
with ``O_APPEND`` and then ``fsync``-ed; a crash can at worst leave the last line cut short, which
readers skip. When every rank has finished, rank 0 merges the rank files into ``manifest.jsonl``
(written to a temporary file and renamed) and removes them; lines are deduplicated exactly, so a
merge interrupted between the rename and the removal is harmless when repeated. An interrupted
batch leaves its rank files behind: the next run reads them like the manifest and merges them.

Example:
    >>> m = Manifest("out", rank=1)
    >>> m.append({"id": "cat", "status": "done", "output": "out/cat.mp4"})
    >>> m.records()[-1]["id"]
    'cat'
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
_RANK_GLOB = "manifest.rank*.jsonl"


class Manifest:
    """The manifest of the batch writing to ``folder``, as seen by rank ``rank``."""

    def __init__(self, folder, rank: int = 0):
        self.folder = Path(folder)
        self.rank = rank
        self.path = self.folder / MANIFEST
        self.rank_path = self.folder / f"manifest.rank{rank}.jsonl"

    def append(self, record: dict[str, Any]) -> None:
        """Add one record to this rank's file: one whole line, one write."""
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        fd = os.open(self.rank_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            if _ends_cut(fd):
                line = "\n" + line  # a crash cut the last line short: start on a line of our own
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        """Every readable record: the merged manifest, then any rank files not merged yet."""
        return [json.loads(text) for text in self._lines()]

    def merge(self) -> Path:
        """Fold every rank file into ``manifest.jsonl`` (rank 0, once all ranks have finished)."""
        lines = list(dict.fromkeys(self._lines()))  # exact duplicates only come from a repeated merge
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".jsonl", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.writelines(text + "\n" for text in lines)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        for rank_file in self.folder.glob(_RANK_GLOB):
            rank_file.unlink(missing_ok=True)
        return self.path

    def _lines(self) -> list[str]:
        files = [self.path] + sorted(self.folder.glob(_RANK_GLOB))
        out = []
        for path in files:
            if not path.is_file():
                continue
            for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if text.strip() and _is_record(text):
                    out.append(text)
                elif text.strip():
                    log.warning("%s line %d is not a whole record (a run was interrupted while "
                                "writing it); it is ignored.", path, number)
        return out


def _ends_cut(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _is_record(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def latest_by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each job id (a job retried after a failure has several), by finishing
    time: the rank files of an interrupted run and of the run after it are read in name order."""
    ordered = sorted(records, key=lambda r: str(r.get("finished_at", "")))
    return {str(r["id"]): r for r in ordered if "id" in r}
