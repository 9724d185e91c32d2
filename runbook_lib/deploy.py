"""The deploy runner: sections 1-5 in order, each as its own papermill run into
one run folder, stopping at the first failure.

    ctx = rb.begin("deploy", globals())
    report = deploy.run(ctx)      # 01-rgw.ipynb, 02-accounts.ipynb, ... in the run folder
    deploy.check(ctx, report)     # summary table + verdict

Each section gets ONLY the parameters it declares (papermill.inspect_notebook),
runs under the `runbook` engine (secrets scrubbed before every save), and leaves
its executed notebook, its HTML and its verdict in the run folder.

What a deploy pays besides the work (bench/profile_deploy.py): one kernel for all the
sections, each in a fresh namespace (kernels.SectionKernel), started by `runbook deploy`
beside this notebook's own kernel; the hosts are checked in it, so one SSH login per host
serves the check, the five sections and the tool versions; HTML in a thread while the next
section runs (Records), joined before run.json is finished or a failure is reported.
"""
from __future__ import annotations

import contextlib
import html as _html
import json
import os
import pathlib
import re
import threading
import time
from dataclasses import dataclass, field

from . import masking, params as P, records
from .kernels import SectionKernel, kernel_name
from .errors import RunbookError

NOTEBOOKS = records.REPO / "notebooks"
_OWNED: set = set()  # run folders this process made (and so finishes)
# Sections deploy runs, in order (those that exist).
SECTION_RE = re.compile(r"^0[1-5]-[a-z0-9-]+\.ipynb$")

class SectionFailed(RunbookError):
    """A section of the deploy failed; its executed notebook is in the run folder."""

    def __init__(self, section: str, error: str, notebook: str, html: str | None):
        self.section, self.error, self.notebook, self.html = section, masking.mask(error), notebook, html
        where = f"executed notebook saved: {notebook}" + (f" (HTML: {html})" if html else "")
        super().__init__(f"section {section} failed: {self.error}\n{where}",
                         "read the failing cell in that notebook, fix the cause, and run deploy again: "
                         "sections that finished report no change")


@dataclass
class SectionResult:
    name: str
    status: str = "pending"  # PASS | FAIL | DRY-RUN | failed (no verdict) | pending
    summary: str = ""
    changed: bool | None = None
    commands: int = 0
    duration: float = 0.0
    ipynb: str | None = None
    html: str | None = None
    error: str | None = None


@dataclass
class DeployReport:
    run: records.Run
    dry_run: bool = False
    sections: list = field(default_factory=list)
    failed: SectionResult | None = None
    owner: bool = False  # this runner made the run folder (so it finishes run.json)

    @property
    def ok(self) -> bool:
        return bool(self.sections) and self.failed is None and all(
            s.status in ("PASS", "DRY-RUN") for s in self.sections)

    def rows(self) -> list[dict]:
        return [{"section": s.name, "verdict": s.status,
                 "changed": "—" if s.changed is None else (("would change" if self.dry_run else "changed")
                                                          if s.changed else "no change"),
                 "commands": s.commands, "duration": f"{s.duration:.1f}s",
                 "notebook": s.ipynb or "", "html": s.html or "", "summary": s.summary or s.error or ""}
                for s in self.sections]

    def __str__(self):
        lines = [f"{'section':<14} {'verdict':<8} {'changed':<13} {'cmds':>5} {'time':>7}  summary"]
        for r in self.rows():
            lines.append(f"{r['section']:<14} {r['verdict']:<8} {r['changed']:<13} {r['commands']:>5} "
                         f"{r['duration']:>7}  {r['summary'][:100]}")
        lines.append(f"records: {self.run.path}  (run.json; each section's .ipynb and .html)")
        return masking.mask("\n".join(lines))

    __repr__ = __str__

    def _repr_html_(self):
        e = _html.escape
        color = {"PASS": "#1a7f37", "DRY-RUN": "#0969da", "FAIL": "#cf222e", "failed": "#cf222e"}
        out = ['<table class="runbook-deploy"><tr><th>section</th><th>verdict</th><th>changed</th>'
               '<th>commands</th><th>duration</th><th>record</th><th>summary</th></tr>']
        for r in self.rows():
            c = color.get(r["verdict"], "#6e7781")
            rec = " ".join(f'<a href="{e(r[k])}">{k}</a>' for k in ("html", "notebook") if r[k])
            out.append(f"<tr><td>{e(r['section'])}</td><td style='color:{c}'><b>{e(r['verdict'])}</b></td>"
                       f"<td>{e(r['changed'])}</td><td>{r['commands']}</td><td>{e(r['duration'])}</td>"
                       f"<td>{rec}</td><td style='text-align:left'>{e(r['summary'][:300])}</td></tr>")
        out.append("</table>")
        out.append(f"<p>records: <code>{e(str(self.run.path))}</code> (<code>run.json</code>, "
                   f"<code>index.md</code> and <code>latest</code> in <code>{e(str(self.run.runs))}</code>)</p>")
        return masking.mask("".join(out))


def sections(notebooks_dir=None) -> list[pathlib.Path]:
    """The section notebooks deploy runs, in order: those of 01..05 that exist."""
    d = pathlib.Path(notebooks_dir or NOTEBOOKS)
    return sorted(p for p in d.glob("0*.ipynb") if SECTION_RE.match(p.name))


def declared_params(notebook) -> dict:
    """{name: {"inferred_type_name": ...}} of a notebook's parameters cell: papermill's
    inspect_notebook, completed from the cell's Python (papermill skips a line whose
    help text holds '=')."""
    import ast

    import nbformat
    import papermill as pm

    declared = dict(pm.inspect_notebook(str(notebook)))
    nb = nbformat.read(str(notebook), as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            try:
                tree = ast.parse(cell.source)
            except SyntaxError:
                break
            for node in tree.body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    declared.setdefault(node.target.id, {"name": node.target.id,
                                                         "inferred_type_name": ast.unparse(node.annotation)})
                elif isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            declared.setdefault(t.id, {"name": t.id, "inferred_type_name": "None"})
            break
    return declared


def section_params(notebook, params: dict) -> dict:
    """Only the parameters this notebook declares, shaped to its declared types."""
    declared = declared_params(notebook)
    out = {}
    for name, info in declared.items():
        if name in params:
            value = params[name]
        else:
            continue
        if isinstance(value, (list, tuple)) and info.get("inferred_type_name") == "str":
            value = ",".join(str(v) for v in value)  # registry_host as a YAML list -> "a,b"
        out[name] = value
    return out


def _journal_lines(run) -> int:
    try:
        with open(run.journal_path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _verdict(run, name: str) -> dict | None:
    f = run.path / f"{name}.verdict.json"
    if f.exists():
        return json.loads(f.read_text())
    for v in run.verdicts():  # a section that named itself differently
        if v.get("section", "").split("-")[0] == name.split("-")[0] and v.get("section") != "deploy":
            return v
    return None


def _learn_secrets() -> None:
    """What the sections' kernels registered becomes known here too (the deploy
    notebook's own output and records are masked with it)."""
    path = os.environ.get(masking.MASK_ENV)
    if path:
        for v in masking.load_file(path):
            if len(v) >= masking.MIN_LEN:
                masking.register(v)


class Records:
    """What the run folder gets off the critical path: each section's HTML (nbconvert, ~0.05 s a
    notebook) and the tool versions, in threads while the next section runs.  `wait()` joins them:
    before run.json is finished and before a failure is reported, so a record is never announced
    before it exists."""

    HEAD_START = 0.15  # seconds a section's HTML waits for the next section to have started

    def __init__(self, run_, kernel=None):
        from concurrent.futures import ThreadPoolExecutor
        self.run = run_
        self.kernel = kernel  # the section kernel: the tool versions run there, over its logins
        # one thread each: HTML one notebook at a time, versions over SSH beside it
        self.html_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records-html")
        self.versions_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records-versions")
        self.html: dict = {}  # section name -> (SectionResult, future)
        self.versions = None
        self._now = threading.Event()  # set by wait(): render without the head start

    def render(self, res: "SectionResult") -> None:
        self.html[res.name] = (res, self.html_pool.submit(self._render, res.ipynb))

    def _render(self, ipynb):
        # a head start for this process's main thread, which starts the next section meanwhile: the
        # render (CPU, the GIL) then runs beside that section's commands, not beside its start
        self._now.wait(self.HEAD_START)
        return self.run.render_html(ipynb)

    def tool_versions(self, params: dict) -> None:
        if self.kernel is not None:
            self.kernel.start_versions(params)
        else:
            self.versions = self.versions_pool.submit(records.tool_versions, params)

    def fetch_versions(self) -> None:
        """The section kernel's tool versions into run.json (before that kernel stops)."""
        if self.kernel is not None:
            v = self.kernel.versions()
            if v:
                self.run.update(tool_versions=v)
            self.kernel = None

    def shutdown(self) -> None:
        self.html_pool.shutdown(wait=True)
        self.versions_pool.shutdown(wait=True)

    def wait(self, name: str | None = None) -> None:
        self._now.set()
        if name is None:
            self.fetch_versions()
        for n, (res, fut) in list(self.html.items()):
            if name is not None and n != name:
                continue
            del self.html[n]
            try:
                fut.result()
            except Exception as e:
                res.html = None
                res.error = res.error or masking.mask(f"HTML rendering failed: {e}")
                self.run.add_notebook(res.name, html=None, status="failed", error=res.error)
        if name is None and self.versions is not None:
            with contextlib.suppress(Exception):
                self.run.update(tool_versions=self.versions.result(timeout=60))
            self.versions = None


def run_section(notebook, run: records.Run, params: dict, *, timeout: float | None = None,
                kernel: SectionKernel | None = None, recs: Records | None = None) -> SectionResult:
    """Execute one section notebook with papermill + the runbook engine into the run folder
    (in `kernel` when given, in a fresh namespace: the caller shuts it down).  Its HTML is
    rendered by `recs` in the background when given (the caller waits for it), else here."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    notebook = pathlib.Path(notebook)
    name = notebook.stem
    out = run.path / notebook.name
    res = SectionResult(name, ipynb=str(out))
    before = _journal_lines(run)
    t0 = time.monotonic()
    import logging
    pm_log = logging.getLogger("papermill")
    level = pm_log.level
    pm_log.setLevel(logging.ERROR)  # its parameter-parsing warnings: we read the cell ourselves
    try:
        if kernel is not None:
            kernel.fresh()
        pm.execute_notebook(str(notebook), str(out), parameters=section_params(notebook, params),
                            engine_name="runbook", cwd=str(notebook.parent), progress_bar=False,
                            log_output=False, execution_timeout=timeout,
                            **({"km": kernel.km, "kc": kernel.kc} if kernel else
                               {"kernel_log": str(run.path / f"{name}.kernel.log")}))
    except PapermillExecutionError as e:
        res.error = f"{e.ename}: {e.evalue}".strip()[-2000:]
    except KeyboardInterrupt as e:  # a second interrupt: papermill stopped waiting (the notebook is saved)
        res.error = f"KeyboardInterrupt: {e}".strip()
    except Exception as e:  # kernel died, timeout, bad notebook
        res.error = f"{type(e).__name__}: {e}"[-2000:]
    finally:
        pm_log.setLevel(level)
    if res.error and res.error.split(":")[0].strip() == "KeyboardInterrupt":
        res.error = "interrupted (SIGINT/SIGTERM): KeyboardInterrupt in the running cell"
    res.duration = time.monotonic() - t0
    _learn_secrets()
    res.error = masking.mask(res.error) if res.error else None
    entries = run.journal()[before:]
    res.commands = sum(1 for e in entries if not e.get("read"))
    if out.exists():
        if recs is not None:
            res.html = str(out.with_suffix(".html"))
            recs.render(res)
        else:
            try:
                res.html = str(run.render_html(out))
            except Exception as e:
                res.error = res.error or f"HTML rendering failed: {e}"
    else:
        res.ipynb = None
    v = _verdict(run, name)
    if v and v.get("ended", 0) >= time.time() - res.duration - 5:  # this run's verdict, not a stale one
        res.status, res.summary = v.get("status", "?"), v.get("summary", "")
        res.changed = bool(v.get("changed"))
    if res.changed is None:
        res.changed = any(e.get("changed") and not e.get("read") for e in entries) if entries else None
    if res.error:
        res.status = "FAIL" if res.status == "FAIL" else "failed"
    elif res.status == "pending":
        res.status = "failed"
        res.error = f"{name} ended without a verdict (no ctx.verdict call)"
    run.add_notebook(name, ipynb=res.ipynb, html=res.html, status="failed" if res.error or res.status == "FAIL"
                     else "completed", duration=res.duration, error=res.error, verdict=res.status,
                     changed=res.changed, section=True)
    return res


def _stack_dumps(run_) -> None:
    """kill -USR1 <kernel pid> writes every thread's stack to <run>/stacks.txt (a stuck run)."""
    import faulthandler
    import signal
    try:
        f = open(run_.path / "stacks.txt", "a")
        faulthandler.register(signal.SIGUSR1, file=f, all_threads=True)
    except (OSError, ValueError, AttributeError):
        pass


def _warm_up() -> None:
    with contextlib.suppress(Exception):  # only a head start: the same imports happen where needed
        import papermill  # noqa: F401
        import papermill.exceptions  # noqa: F401
        records.warm_html()


def run(ctx, only=None, notebooks_dir=None, timeout: float | None = None) -> DeployReport:
    """Run the sections in order into the run folder; stop at the first failure
    (raises SectionFailed naming the section and its saved notebook)."""
    from IPython.display import display

    run_ = records.Run.current()
    if run_ is not None and str(run_.path) in _OWNED:
        run_ = None  # run again in the same kernel (JupyterLab): a new run folder
    owner = run_ is None
    if owner:
        run_ = records.Run.create("deploy", params=ctx.params, prefer_repo=True)
        _OWNED.add(str(run_.path))
        os.environ.update(run_.env())  # the sections' engine and kernels write here
    run_.update(parameters=masking.mask(ctx.params), dry_run=ctx.dry_run)
    # Every host at once, before section 1 changes anything: a refused login or a sudo that
    # wants a password on the last host must not leave the first half deployed.
    report = DeployReport(run_, dry_run=ctx.dry_run, owner=owner)
    _stack_dumps(run_)
    todo = sections(notebooks_dir)
    if only:
        todo = [p for p in todo if p.stem in P.as_list(only) or p.stem.split("-")[0] in P.as_list(only)]
    print(f"run folder: {run_.path}")
    with masking.mask_session(ctx.state_dir), contextlib.ExitStack() as stack:
        # the CLI's (started beside this kernel), else one of our own
        kernel = SectionKernel.attach_or_start(todo[0].parent, run_.path / "kernel.log",
                                               kernel_name(todo[0])) if todo else None
        recs = Records(run_, kernel)
        if kernel:
            # what run_section and the records need first (papermill ~0.2 s, nbconvert's first render
            # ~0.4 s), loaded while the hosts are checked rather than between sections
            threading.Thread(target=_warm_up, name="deploy-warm-up", daemon=True).start()
        if kernel:
            stack.callback(lambda: (kernel.stop(wait=True), kernel.scrub_log()))  # none left behind
            if kernel.owner:
                kernel.prewarm()
        stack.callback(recs.shutdown)
        try:
            # in the section kernel: the sections then reuse its logins
            access = kernel.check_hosts(ctx.params) if kernel else ctx.check_hosts()
        except RunbookError as e:
            _finish(report, owner, error=f"hosts not ready, nothing changed: {e.message}")
            raise
        print("hosts: " + ", ".join(f"{a} ({how})" for a, how in access.items()))
        print(f"sections: {', '.join(p.stem for p in todo) or '(none found in ' + str(notebooks_dir or NOTEBOOKS) + ')'}"
              + ("  [dry run: nothing will change]" if ctx.dry_run else ""))
        try:
            for nb in todo:
                print(f"▶ {nb.stem} ...", flush=True)
                res = run_section(nb, run_, ctx.params, timeout=timeout, kernel=kernel, recs=recs)
                report.sections.append(res)
                if len(report.sections) == 1:
                    # over the section kernel's logins, while the other sections run (not beside the
                    # first: its start is on the critical path)
                    recs.tool_versions(ctx.params)
                changed = "—" if res.changed is None else (("would change" if ctx.dry_run else "changed")
                                                            if res.changed else "no change")
                print(masking.mask(f"  {res.status} in {res.duration:.1f}s, {changed}: "
                                   f"{res.summary or res.error or ''}"), flush=True)
                if res.error:
                    report.failed = res
                    recs.wait()
                    _finish(report, owner, error=f"section {res.name} failed: {res.error}")
                    display(report)
                    raise SectionFailed(res.name, res.error, res.ipynb or "(not written)", res.html)
        except KeyboardInterrupt:  # between sections (in one, the section fails as interrupted)
            recs.wait()
            _finish(report, owner, error="interrupted (SIGINT/SIGTERM) between sections")
            raise
        recs.fetch_versions()
        if kernel:
            kernel.stop()  # its shut-down beside the last HTML (the ExitStack joins it)
        recs.wait()
    return report


def _finish(report: DeployReport, owner: bool, error: str | None = None):
    if owner:
        try:
            report.run.finish(error=error)
        except Exception as e:  # records are best effort; never hide the run's outcome
            print(f"warning: could not finish the run record: {e}")
    else:
        report.run.update(error=error) if error else None


def check(ctx, report: DeployReport) -> None:
    """The deploy's verdict: every section reached its outcome.  Shows the summary table
    (and returns nothing, so the cell shows only that)."""
    from IPython.display import display

    display(report)
    n = len(report.sections)
    changed = [s.name for s in report.sections if s.changed]
    if not n:
        summary = "no section notebooks found"
    else:
        what = ("would change: " if ctx.dry_run else "changed: ") + ", ".join(changed) if changed else "no change"
        summary = f"{n} section(s) {'checked' if ctx.dry_run else 'deployed'}, {what}"
    try:
        ctx.verdict(report.ok, summary, records=str(report.run.path),
                           run_json=str(report.run.json_path),
                           html=", ".join(pathlib.Path(s.html).name for s in report.sections if s.html))
    finally:
        _finish(report, report.owner)
