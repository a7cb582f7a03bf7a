"""A resumable record of finished evaluation work: one JSON line per perplexity result or generated
answer, appended and flushed as each finishes, so a long evaluation stopped at any point (a CPU run of
hours, a lost GPU lease) continues where it stopped. Entries are keyed by what determines them (model
weights, scheme, backend, task inputs), so a rerun with more trials, depths or schemes reuses the probes
already answered and a changed model or prompt never reuses a stale one."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..record import fingerprint


def model_key(model: nn.Module) -> str:
    """A hash of the model's weights and dtype: answers recorded for other weights are never reused."""
    params = {name: p for name, p in model.named_parameters()}
    return fingerprint(params) or "no-parameters"


def entry_key(fields: dict[str, Any]) -> str:
    """A stable hash of the fields that determine an entry (a prompt enters by its own hash)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """``(line, record)`` for each whole line of a journal file (a line cut short by a crash is skipped)."""
    for line in path.read_text().splitlines():
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            continue


class Journal:
    """Append-only JSON lines at ``path``; ``resume=False`` starts it empty (at the first result). A line
    cut short by a crash is skipped on reading (the entry is recomputed)."""

    def __init__(self, path: str | Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.entries: dict[str, Any] = {}
        self.reused = 0
        self._kept: list[str] | None = []  # lines to start the file with, at the first put (None: started)
        if resume and self.path.exists():
            for line, record in _records(self.path):
                self.entries[record["key"]] = record["value"]
                self._kept.append(line)

    def _start(self) -> None:
        """Create the file (nothing is written before the first result, so a refused run leaves no trace),
        rewritten whole without a cut-short line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_name(self.path.name + ".tmp")
        staged.write_text("".join(f"{line}\n" for line in self._kept or []))
        os.replace(staged, self.path)
        self._kept = None

    def _append(self, lines: list[str]) -> None:
        """``lines`` at the end of the file (created first, with the kept lines), flushed to disk."""
        if self._kept is not None:
            self._start()
        with self.path.open("a") as handle:
            handle.write("".join(f"{line}\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())

    def absorb(self, path: str | Path) -> int:
        """Add the entries of another journal at ``path`` (one committed beside a report, say) that this one
        lacks, written here at once; how many were added. Keys carry what determines an entry, so an entry
        made for other weights or prompts is absorbed but never matched."""
        added: list[str] = []
        for line, record in _records(Path(path)):
            if record["key"] not in self.entries:
                self.entries[record["key"]] = record["value"]
                added.append(line)
        if added:
            self._append(added)
        return len(added)

    def get(self, fields: dict[str, Any]) -> Any | None:
        value = self.entries.get(entry_key(fields))
        self.reused += value is not None
        return value

    def put(self, fields: dict[str, Any], value: Any) -> None:
        key = entry_key(fields)
        self.entries[key] = value
        self._append([json.dumps({"key": key, "fields": fields, "value": value})])

    def __len__(self) -> int:
        return len(self.entries)
