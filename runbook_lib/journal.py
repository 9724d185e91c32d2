"""The per-run journal: every command, file write and HTTP call, masked.

Results are collected into the step that is active when they happen (a
contextvar, so parallel work per host lands in the right step), and appended as
JSON lines to $RUNBOOK_JOURNAL when set (the run folder's record).
"""
from __future__ import annotations

import contextvars
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .masking import mask

_lock = threading.Lock()
_entries: list[dict] = []
current_step: contextvars.ContextVar = contextvars.ContextVar("current_step", default=None)


@dataclass
class Result:
    """One action on one target (a shell command, a file write, an HTTP call).

    stdout/stderr hold the real text for the caller to parse; everything that
    prints, records or raises goes through `record()`, which masks, and drops
    the output entirely for no_log actions.
    """
    host: str
    command: str
    exit_code: int | None = 0
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    changed: bool = False
    read: bool = False
    skipped: bool = False  # dry-run: would have run
    no_log: bool = False
    kind: str = "cmd"  # cmd | file | http
    become: bool = False  # ran as root through sudo (the host's become)
    started: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.skipped or self.exit_code == 0

    def record(self) -> dict:
        out = "<no_log>" if self.no_log else mask(self.stdout)[-4000:]
        err = "<no_log>" if self.no_log else mask(self.stderr)[-4000:]
        return {
            "host": self.host, "kind": self.kind, "command": mask(self.command),
            "exit_code": self.exit_code, "duration": round(self.duration, 4),
            "changed": self.changed, "read": self.read, "skipped": self.skipped, "become": self.become,
            "stdout": out, "stderr": err,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
        }

    def __repr__(self):
        state = "would run" if self.skipped else f"exit {self.exit_code}"
        return f"<Result {self.host}: {mask(self.command)} ({state}, {self.duration:.2f}s)>"


def record(result: Result) -> Result:
    entry = result.record()
    step = current_step.get()
    if step is not None:
        entry["step"] = step.title
        step.results.append(result)
    with _lock:
        _entries.append(entry)
        path = os.environ.get("RUNBOOK_JOURNAL")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")
    return result


def entries() -> list[dict]:
    with _lock:
        return list(_entries)


def clear() -> None:
    with _lock:
        _entries.clear()


def parallel(fn, items, max_workers: int = 8) -> list:
    """Run fn(item) for each item in threads, keeping the active step (contextvars)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as ex:
        futs = [ex.submit(contextvars.copy_context().run, fn, i) for i in items]
        return [f.result() for f in futs]
