"""The run folder: the audit record every run of every notebook leaves behind.

    runs/<UTC time>-<name>/
        <section>.ipynb, <section>.html   executed notebooks (secrets scrubbed) and their offline HTML
        <section>.verdict.json            written by ctx.verdict() in the section's kernel
        journal.jsonl                     every command on every host (masked), from the kernels
        kernel.log                        the sections' kernel's own stderr (deploy runs; scrubbed)
        run.json                          parameters (masked), who/where, times, verdicts, commands, versions
    runs/index.md                         one line per run, newest first
    runs/latest -> <newest run folder>

Whoever creates the folder (the deploy runner, the `runbook` CLI, or the papermill
engine when $RUNBOOK_RUN_DIR is unset) exports $RUNBOOK_RUN_DIR and $RUNBOOK_JOURNAL
so that the kernels write into it, and calls `Run.finish()` at the end.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import pathlib
import platform
import socket
import threading
import time

from . import masking

RUNS_ENV = "RUNBOOK_RUNS_DIR"
RUN_DIR_ENV = "RUNBOOK_RUN_DIR"
JOURNAL_ENV = "RUNBOOK_JOURNAL"
REPO = pathlib.Path(__file__).resolve().parent.parent
RUNNING = "RUNNING"

_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def _utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def runs_dir(prefer_repo: bool = False) -> pathlib.Path:
    """$RUNBOOK_RUNS_DIR, else ./runs (the shell's working directory, not a
    papermill --cwd), or with prefer_repo the repository's runs/ when we run from a checkout."""
    env = os.environ.get(RUNS_ENV)
    if env:
        return pathlib.Path(env).expanduser().resolve()
    if prefer_repo and (REPO / "notebooks").is_dir():
        return REPO / "runs"
    pwd = os.environ.get("PWD")
    base = pathlib.Path(pwd if pwd and os.path.isdir(pwd) else os.getcwd()).resolve()
    if base == REPO / "notebooks":  # running from notebooks/: the repo's runs/, not notebooks/runs
        base = REPO
    return base / "runs"


def _write_json(path: pathlib.Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class Run:
    """One run folder."""

    def __init__(self, path):
        self.path = pathlib.Path(path).resolve()
        self.runs = self.path.parent

    def __repr__(self):
        return f"<Run {self.path}>"

    def __str__(self):
        return str(self.path)

    # -- creation ---------------------------------------------------------------
    @classmethod
    def create(cls, name: str, runs: str | os.PathLike | None = None, *, params: dict | None = None,
               prefer_repo: bool = False) -> "Run":
        runs = pathlib.Path(runs).expanduser().resolve() if runs else runs_dir(prefer_repo)
        runs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"
        for i in range(1, 1000):
            path = runs / (f"{stamp}-{safe}" if i == 1 else f"{stamp}-{safe}-{i}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        run = cls(path)
        run.update(name=name, folder=path.name, outcome=RUNNING, started=_utc(time.time()),
                   started_ts=time.time(), ended=None, user=getpass.getuser(), hostname=socket.gethostname(),
                   parameters=masking.mask(params or {}), runbook_version=_version())
        run.publish()
        return run

    @classmethod
    def current(cls) -> "Run | None":
        """The run folder the environment points at, if any."""
        d = os.environ.get(RUN_DIR_ENV)
        return cls(d) if d and os.path.isdir(d) else None

    @property
    def journal_path(self) -> pathlib.Path:
        return self.path / "journal.jsonl"

    def env(self) -> dict:
        """What kernels need to write into this folder."""
        return {RUN_DIR_ENV: str(self.path), JOURNAL_ENV: str(self.journal_path)}

    # -- run.json ---------------------------------------------------------------
    @property
    def json_path(self) -> pathlib.Path:
        return self.path / "run.json"

    def data(self) -> dict:
        try:
            return json.loads(self.json_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def update(self, **fields) -> dict:
        """Merge fields into run.json (notebooks merge by name)."""
        data = self.data()
        nbs = fields.pop("notebooks", None)
        data.update(masking.mask(fields))
        if nbs:
            byname = {n["name"]: n for n in data.get("notebooks", [])}
            for n in nbs:
                byname[n["name"]] = {**byname.get(n["name"], {}), **masking.mask(n)}
            data["notebooks"] = list(byname.values())
        _write_json(self.json_path, data)
        return data

    def add_notebook(self, name: str, *, ipynb=None, html=None, status: str, duration: float | None = None,
                     error: str | None = None, **extra) -> None:
        entry = {"name": name, "ipynb": self._rel(ipynb), "html": self._rel(html), "status": status,
                 "duration": round(duration, 2) if duration is not None else None, "error": error, **extra}
        self.update(notebooks=[entry])

    def _rel(self, p):
        if p is None:
            return None
        p = pathlib.Path(p).resolve()
        try:
            return str(p.relative_to(self.path))
        except ValueError:
            return str(p)

    def verdicts(self) -> list[dict]:
        out = []
        for f in sorted(self.path.glob("*.verdict.json")):
            try:
                out.append(json.loads(f.read_text()))
            except ValueError:
                continue
        return out

    def journal(self) -> list[dict]:
        out = []
        try:
            with open(self.journal_path) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        try:
                            out.append(json.loads(line))
                        except ValueError:
                            continue
        except FileNotFoundError:
            pass
        return out

    def finish(self, *, error: str | None = None, versions: bool = True, params: dict | None = None) -> dict:
        """Write the final run.json (verdicts, commands, versions, outcome) and publish
        it in index.md / latest.  Safe to call more than once (the last call wins)."""
        data = self.data()
        params = params if params is not None else data.get("parameters") or {}
        fields = {"ended": _utc(time.time()), "ended_ts": time.time(), "parameters": masking.mask(params)}
        if data.get("started_ts"):
            fields["duration"] = round(time.time() - data["started_ts"], 2)
        if error:
            fields["error"] = masking.mask(error)
        if versions and not data.get("tool_versions"):
            fields["tool_versions"] = tool_versions(params)
        verdicts = self.verdicts()
        fields["sections"] = [{k: v.get(k) for k in ("section", "status", "summary", "changed", "counts", "facts",
                                                     "steps", "started", "ended")} for v in verdicts]
        entries = self.journal()
        fields["commands"] = [{k: e.get(k) for k in ("time", "host", "kind", "command", "exit_code", "duration",
                                                     "changed", "read", "skipped", "become", "step")}
                              | {"ok": e.get("skipped") or e.get("exit_code") == 0} for e in entries]
        fields["changed"] = any(e.get("changed") and not e.get("read") and not e.get("skipped") for e in entries)
        fields["would_change"] = any(e.get("changed") and e.get("skipped") for e in entries)
        data = self.update(**fields)
        data["outcome"] = outcome(data, verdicts, bool(params.get("dry_run")))
        data = self.update(outcome=data["outcome"])
        self.publish()
        return data

    # -- HTML -------------------------------------------------------------------
    def render_html(self, ipynb) -> pathlib.Path:
        return render_html(ipynb)

    # -- index.md and latest --------------------------------------------------------
    def publish(self) -> None:
        write_index(self.runs)
        link = self.runs / "latest"
        tmp = self.runs / f".latest.{os.getpid()}"
        try:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            tmp.symlink_to(self.path.name)
            os.replace(tmp, link)
        except OSError:
            pass


def outcome(data: dict, verdicts: list[dict], dry_run: bool) -> str:
    """FAIL if a notebook failed or a verdict failed; else DRY-RUN / PASS."""
    if data.get("error") or any(n.get("status") == "failed" for n in data.get("notebooks", [])):
        return "FAIL"
    if any(v.get("status") == "FAIL" for v in verdicts):
        return "FAIL"
    if dry_run or any(v.get("status") == "DRY-RUN" for v in verdicts):
        return "DRY-RUN"
    return "PASS"


def list_runs(runs=None) -> list[dict]:
    """Every run under the runs folder (run.json + folder), newest first."""
    runs = pathlib.Path(runs) if runs else runs_dir()
    out = []
    if not runs.is_dir():
        return out
    for d in runs.iterdir():
        if d.is_symlink() or not d.is_dir():
            continue
        try:
            data = json.loads((d / "run.json").read_text())
        except (FileNotFoundError, ValueError):
            continue
        data["folder"] = d.name
        out.append(data)
    out.sort(key=lambda r: (r.get("started") or "", r["folder"]), reverse=True)
    return out


def write_index(runs) -> pathlib.Path:
    runs = pathlib.Path(runs)
    lines = ["# Runs (newest first)", "",
             "`latest` points at the newest run folder; each folder's `run.json` has the details.", "",
             "| time (UTC) | name | outcome | changed | folder |", "|---|---|---|---|---|"]
    for r in list_runs(runs):
        changed = ("" if r.get("outcome") == RUNNING else "yes" if r.get("changed")
                   else "would" if r.get("would_change") else "no")
        lines.append(f"| {r.get('started', '')} | {r.get('name', '')} | {r.get('outcome', '?')} | {changed} "
                     f"| [{r['folder']}]({r['folder']}/) |")
    path = runs / "index.md"
    tmp = runs / f".index.md.{os.getpid()}"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def render_html(ipynb) -> pathlib.Path:
    """The executed notebook as HTML next to it, self-contained (CSS inline, no CDN scripts)."""
    import nbformat

    ipynb = pathlib.Path(ipynb)
    nb = nbformat.read(str(ipynb), as_version=4)
    out = ipynb.with_suffix(".html")
    out.write_text(masking.mask(_html(nb, ipynb.stem)))
    return out


_exporter = None
_exporter_lock = threading.Lock()


def _html(nb, name: str) -> str:
    """One exporter per process, its compiled templates reused (a new one compiles them again:
    ~0.05 s of a ~0.1 s render); a lock, since the records render from threads."""
    global _exporter
    with _exporter_lock:
        if _exporter is None:
            import jinja2
            from nbconvert import HTMLExporter
            _exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"runbook_offline.html.j2": _OFFLINE_TEMPLATE})],
                                     template_file="runbook_offline.html.j2")
        return _exporter.from_notebook_node(nb, resources={"metadata": {"name": name}})[0]


def warm_html() -> None:
    """A small notebook rendered in memory: nbconvert's imports, its lazy imports (markdown,
    highlighting) and the template's compile, ~0.25 s the first time and ~0.07 s after, are
    then paid before the run's last step (its own HTML) needs them."""
    import nbformat.v4 as v4
    nb = v4.new_notebook(cells=[v4.new_markdown_cell("# warm `up`"), v4.new_code_cell(
        "print(1)", outputs=[v4.new_output("stream", name="stdout", text="1\n"),
                             v4.new_output("display_data", data={"text/html": "<b>1</b>", "text/plain": "1"})])])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    _html(nb, "warm-up")


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:
        return "unknown"


# -- tool versions (best effort, through the host layer) ------------------------------------------
VERSION_COMMANDS = {
    # (which host parameter, label): shell commands tried in order; the first that succeeds wins
    "ceph": ("rgw_host", ["ceph --version"]),
    "registry": ("registry_host", [
        "docker-registry --version",
        "docker exec registry registry --version",
        "docker image inspect --format '{{index .RepoTags 0}} {{.Id}}' registry:2",
        "podman exec registry registry --version",  # runtime=podman hosts (no docker)
    ]),
    "docker": ("registry_host", ["docker version --format 'client {{.Client.Version}} server {{.Server.Version}}'"]),
    "podman": ("registry_host", ["podman version --format 'podman {{.Client.Version}}'"]),
}


def tool_versions(params: dict, timeout: float = 15, close: bool = True) -> dict:
    """Versions of what the run used; 'unknown' where a host or tool does not answer.
    close=False leaves the SSH logins in this process's pool (the sections use them)."""
    from .host import Command, connect
    from .journal import parallel
    from . import params as P

    out = {"runbook_lib": _version(), "python": platform.python_version()}
    from importlib import metadata
    for mod in ("papermill", "nbclient", "fabric"):
        try:  # from its installed metadata: importing papermill here costs a kernel ~0.2 s
            out[mod] = metadata.version(mod)
        except Exception:
            out[mod] = "unknown"
    hosts = {}

    def host_for(addr):
        if addr not in hosts:
            hosts[addr] = connect(addr, params, connect_timeout=5)
        return hosts[addr]

    def probe(job):
        label, addr, commands = job
        try:
            h = host_for(addr)
            for c in commands:
                r = h.run(Command(c), read=True, check=False, timeout=timeout)
                text = (r.stdout.strip() or r.stderr.strip()).splitlines()
                if r.exit_code == 0 and text:
                    return label, text[0][:200]
        except Exception as e:  # best effort: an unreachable host is recorded, not fatal
            return label, f"unknown ({type(e).__name__})"
        return label, "unknown"

    jobs = []
    for label, (pname, commands) in VERSION_COMMANDS.items():
        addrs = P.as_list(params.get(pname) or "")
        for a in addrs:
            jobs.append((label if len(addrs) == 1 else f"{label}@{a}", a, commands))
    jobs.append(("docker_control_node", "local", ["docker version --format '{{.Client.Version}}'"]))
    try:
        # one connection per host, so probes of one host run in sequence
        by_host: dict[str, list] = {}
        for j in jobs:
            by_host.setdefault(j[1], []).append(j)
        for results in parallel(lambda js: [probe(j) for j in js], list(by_host.values())):
            out.update(dict(results))
    finally:
        for h in hosts.values() if close else ():
            try:
                h.close()
            except Exception:
                pass
    return masking.mask(out)


_versions_job = None


def versions_in_background(params: dict) -> None:
    """tool_versions in a thread of this process, over the logins it already has: the deploy's
    section kernel runs it beside section 1, so that the deploy notebook's kernel logs in nowhere."""
    global _versions_job
    from concurrent.futures import ThreadPoolExecutor
    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records-versions")
    _versions_job = ex.submit(tool_versions, params, close=False)
    ex.shutdown(wait=False)


def versions_result(timeout: float = 30) -> dict | None:
    """What versions_in_background found (None: not started, or it failed)."""
    try:
        return _versions_job.result(timeout=timeout) if _versions_job is not None else None
    except Exception:
        return None
