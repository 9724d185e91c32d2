"""Steps: each library action is a step that reports ok / changed / failed
(or "would change" in dry-run) as data, with the commands it ran.

    @step("Create the RGW user {uid}")
    def create_user(ctx, uid): ...

The decorated function returns a value (kept in report.value) and may add
facts with `fact(name, value)` or rows with `row(dict)`; its status comes from
the results recorded while it ran, or `mark_changed()`.
"""
from __future__ import annotations

import functools
import html
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import RunbookError
from .journal import current_step
from .masking import mask

ICON = {"ok": "✔ ok", "changed": "✎ changed", "failed": "✘ failed", "would change": "… would change",
        "skipped": "– skipped"}
COLOR = {"ok": "#1a7f37", "changed": "#9a6700", "failed": "#cf222e", "would change": "#0969da",
         "skipped": "#6e7781"}
_all_reports: list["StepReport"] = []


@dataclass
class StepReport:
    title: str
    status: str = "ok"
    facts: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    results: list = field(default_factory=list)
    message: str = ""
    duration: float = 0.0
    value: Any = None
    forced_change: bool = False

    @property
    def changed(self) -> bool:
        return self.status in ("changed", "would change")

    def finish(self):
        cmds = [r for r in self.results if not r.read]
        if any(r.skipped for r in cmds) or (self.forced_change and _dry(self)):
            self.status = "would change"
        elif self.forced_change or any(r.changed for r in cmds):
            self.status = "changed"
        else:
            self.status = "ok"

    def record(self) -> dict:
        return mask({"title": self.title, "status": self.status, "duration": round(self.duration, 3),
                     "facts": {k: str(v) for k, v in self.facts.items()}, "message": self.message,
                     "commands": len(self.results)})

    # -- display -----------------------------------------------------------
    def __str__(self):
        lines = [f"[{ICON[self.status]}] {self.title} ({self.duration:.1f}s)"]
        for k, v in self.facts.items():
            lines.append(f"    {k}: {v}")
        if self.message:
            lines.append(f"    {self.message}")
        for r in self.results:
            if not r.read or self.status == "failed":
                state = "would run" if r.skipped else f"exit {r.exit_code}"
                lines.append(f"    $ [{r.host}] {r.command}  ({state})")
        return mask("\n".join(lines))

    __repr__ = __str__

    def _repr_html_(self):
        e = html.escape
        color = COLOR[self.status]
        out = [f'<div class="runbook-step" style="border-left:4px solid {color};padding:2px 8px;margin:4px 0">',
               f'<b style="color:{color}">{e(ICON[self.status])}</b> <b>{e(self.title)}</b> '
               f'<span style="color:#6e7781">({self.duration:.1f}s)</span>']
        if self.facts:
            out.append('<table style="margin:2px 0">' + "".join(
                f"<tr><td style='text-align:left'><i>{e(str(k))}</i></td><td style='text-align:left'>{e(str(v))}</td></tr>"
                for k, v in self.facts.items()) + "</table>")
        if self.rows:
            cols = list(dict.fromkeys(c for r in self.rows for c in r))
            out.append("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in cols) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td style='text-align:left'>{e(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                for r in self.rows) + "</table>")
        if self.message:
            out.append(f"<div>{e(self.message)}</div>")
        shown = [r for r in self.results if not r.read] or self.results
        if shown:
            out.append(f"<details><summary>{len(self.results)} command(s) on "
                       f"{e(', '.join(sorted({r.host for r in self.results})))}</summary><table>"
                       "<tr><th>host</th><th>command</th><th>result</th><th>s</th><th>changed</th></tr>")
            for r in self.results:
                state = "would run" if r.skipped else ("read" if r.read else f"exit {r.exit_code}")
                out.append(f"<tr><td>{e(r.host)}</td><td style='text-align:left'><code>{e(r.command[:300])}</code></td>"
                           f"<td>{e(state)}</td><td>{r.duration:.2f}</td><td>{'yes' if r.changed else ''}</td></tr>")
            out.append("</table></details>")
        out.append("</div>")
        return mask("".join(out))


def _dry(rep) -> bool:
    from . import context
    ctx = context.current()
    return bool(ctx and ctx.dry_run)


def current() -> StepReport | None:
    return current_step.get()


def fact(name: str, value) -> None:
    rep = current_step.get()
    if rep is not None:
        rep.facts[name] = mask(value) if isinstance(value, str) else value


def row(**values) -> None:
    rep = current_step.get()
    if rep is not None:
        rep.rows.append(mask(values))


def mark_changed(message: str | None = None) -> None:
    """Say the step changed something not seen in commands (an HTTP call, a local file)."""
    rep = current_step.get()
    if rep is not None:
        rep.forced_change = True
        if message:
            rep.message = message


def note(message: str) -> None:
    rep = current_step.get()
    if rep is not None:
        rep.message = (rep.message + " " if rep.message else "") + mask(message)


def reports() -> list[StepReport]:
    return list(_all_reports)


def reset() -> None:
    """A new section starts (begin): its verdict counts only its own steps, also when the
    kernel ran another section before (deploy runs every section in one kernel)."""
    _all_reports.clear()


def step(title: str):
    """Decorator: run the function as a step; returns a StepReport (value in .value).

    The title may name the function's arguments: "Create user {uid}".
    """
    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind_partial(*args, **kwargs)
                bound.apply_defaults()
                t = title.format(**{k: v for k, v in bound.arguments.items()})
            except (KeyError, IndexError, AttributeError):
                t = title
            rep = StepReport(mask(t))
            token = current_step.set(rep)
            t0 = time.monotonic()
            try:
                rep.value = fn(*args, **kwargs)
            except BaseException as exc:
                rep.status = "failed"
                rep.message = mask(str(exc))
                rep.duration = time.monotonic() - t0
                _all_reports.append(rep)
                if isinstance(exc, RunbookError):
                    exc.report = rep
                _display_failed(rep)
                raise
            finally:
                current_step.reset(token)
            rep.duration = time.monotonic() - t0
            rep.finish()
            _all_reports.append(rep)
            return rep
        return wrapper
    return deco


def _display_failed(rep):
    """In a notebook, show the failed step before the traceback."""
    try:
        from IPython import get_ipython
        from IPython.display import display
        if get_ipython() is not None:
            display(rep)
    except ImportError:
        pass
