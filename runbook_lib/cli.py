"""`runbook`: run the notebooks with a run folder and the scrubbing engine set up.

    runbook deploy -f params/lab.yaml [-p NAME VALUE ...] [--dry-run]
    runbook run notebooks/04-registry.ipynb -f params/lab.yaml -p storage s3
    runbook runs            # the index of run folders, newest first
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

from . import masking, records

DEPLOY = records.REPO / "notebooks" / "deploy.ipynb"


def _value(text: str):
    """A -p value typed as papermill's CLI types it (True/False/None, int, float, else str): its rule
    (papermill.cli._resolve_type, a private name; tests/test_kernels.py compares the two), here so
    that papermill is imported only once the kernels boot."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for typ in (int, float):
        try:
            return typ(text)
        except ValueError:
            pass
    return text


def load_params(files, pairs, dry_run: bool = False) -> dict:
    import yaml
    params: dict = {}
    for f in files or []:
        with open(f) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"runbook: {f}: expected a mapping of parameter names to values")
        params.update(data)
    for name, value in pairs or []:
        params[name] = _value(value)
    if dry_run:
        params["dry_run"] = True
    return params


class _Kernels:
    """The kernels a run executes in, started before papermill is imported (see kernels.py): the
    notebook's own and, for deploy.ipynb, the sections' (prewarmed: imports, SSH logins).  Both are
    killed in the background once papermill is done (they are idle then), and joined before we exit."""

    def __init__(self, notebook: pathlib.Path, params: dict, run):
        from . import kernels
        self.section = None
        self.stopped = False
        self.saved = os.environ.get(kernels.ENV)
        os.environ.pop(kernels.ENV, None)
        if notebook.stem == "deploy":
            from . import deploy
            todo = deploy.sections()
            if todo:
                self.section = kernels.SectionKernel(todo[0].parent, run.path / "kernel.log",
                                                     kernels.kernel_name(todo[0]))
                from .params import notebook_defaults
                self.section.prewarm({**notebook_defaults(notebook), **params})
                os.environ[kernels.ENV] = f"{self.section.pid}:{self.section.km.connection_file}"
        # the notebook's kernel inherits the environment (run folder, mask file, the section kernel)
        self.km = kernels.start(kernels.kernel_name(notebook), notebook.parent)
        # and imports the library while papermill is imported here (binding no name in its namespace),
        # through a client of its own session: km.client()'s share nbclient's socket identity
        from jupyter_client import BlockingKernelClient
        self.kc = BlockingKernelClient()
        self.kc.load_connection_info(self.km.get_connection_info())
        self.kc.allow_stdin = False  # as nbclient's own clients: input() fails instead of hanging
        self.kc.start_channels()
        self.kc.execute("__import__('runbook_lib.deploy')", silent=True, store_history=False)
        self.stoppers = []

    def ready(self):
        """The notebook's kernel and its client, ready (papermill gets both: nbclient's own
        client start would wait_for_ready, 0.2 s longer; see kernels.wait_ready)."""
        from . import kernels
        kernels.wait_ready(self.kc, self.km)
        return self.km, self.kc

    def stop(self) -> None:
        from . import kernels
        if self.stopped:
            return
        self.stopped = True
        self.kc.stop_channels()
        self.stoppers.append(kernels.stop_in_background(self.km))
        if self.section is not None:
            self.section.stop()

    def join(self) -> None:
        for t in self.stoppers:
            t.join(10)
        if self.section is not None:
            self.section.stop(wait=True)
            self.section.scrub_log()
        from . import kernels
        if self.saved is None:
            os.environ.pop(kernels.ENV, None)
        else:
            os.environ[kernels.ENV] = self.saved


def execute(notebook, params: dict, *, name: str | None = None, runs_dir=None, out=sys.stdout) -> int:
    """Run one notebook with papermill + the runbook engine into a fresh run folder.
    Returns the exit code (0 when the notebook and its verdict passed)."""
    from .context import notebook_state_dir

    notebook = pathlib.Path(notebook).resolve()
    if not notebook.exists():
        print(f"runbook: no such notebook: {notebook}", file=sys.stderr)
        return 2
    name = name or notebook.stem
    for k, v in params.items():  # -p registry_password ...: masked in run.json too, not only in the notebook
        if masking.SECRET_PARAM_RE.search(k) and isinstance(v, str) and len(v) >= masking.MIN_LEN:
            masking.register(v)
    run = records.Run.create(name, runs_dir, params=params, prefer_repo=True)
    print(f"run folder: {run.path}", file=out, flush=True)
    saved = {k: os.environ.get(k) for k in run.env()}
    os.environ.update(run.env())
    target = run.path / notebook.name
    error = None
    kernels = None
    try:
        with masking.mask_session(notebook_state_dir(params)):
            kernels = _Kernels(notebook, params, run)
            # they boot while papermill is imported; nbconvert's first render (~0.5 s of CPU with its
            # imports) while the notebook runs, not after it (the HTML is the last step), and not
            # while they boot
            import threading
            t = threading.Timer(1.5, records.warm_html)
            t.daemon = True
            t.start()
            import papermill as pm
            from papermill.exceptions import PapermillExecutionError
            try:
                km, kc = kernels.ready()
                pm.execute_notebook(str(notebook), str(target), parameters=params, engine_name="runbook",
                                    cwd=str(notebook.parent), progress_bar=False, log_output=True,
                                    km=km, kc=kc)
            except PapermillExecutionError as e:
                error = f"{e.ename}: {e.evalue}"
            except KeyboardInterrupt as e:  # a second SIGINT/SIGTERM: stop waiting, still write the records
                error = f"interrupted (KeyboardInterrupt: {e})"
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            kernels.stop()
            error = masking.mask(error) if error else None
            html = None
            if target.exists():
                try:
                    html = run.render_html(target)
                except Exception as e:
                    print(f"warning: HTML rendering failed: {e}", file=sys.stderr)
            run.add_notebook(name, ipynb=target if target.exists() else None, html=html,
                             status="failed" if error else "completed", error=error)
            data = run.finish(error=error, params=_full_params(target, params))
    finally:
        if kernels is not None:
            kernels.stop()
            kernels.join()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if error:
        print(f"\nFAILED: {error}", file=out)
    print(f"\noutcome: {data.get('outcome')}\nrecords: {run.path} (run.json, {notebook.stem}.html)\n"
          f"index:   {run.runs / 'index.md'}", file=out)
    return 0 if data.get("outcome") in ("PASS", "DRY-RUN") else 1


def _full_params(executed, given: dict) -> dict:
    try:
        import nbformat

        from .engine import notebook_parameters
        return {**notebook_parameters(nbformat.read(str(executed), as_version=4)), **given}
    except Exception:
        return given


def cmd_runs(args) -> int:
    runs = pathlib.Path(args.runs_dir) if args.runs_dir else records.runs_dir(prefer_repo=True)
    rows = records.list_runs(runs)
    if not rows:
        print(f"no runs in {runs}")
        return 0
    records.write_index(runs)
    print(f"{'time (UTC)':<21} {'name':<16} {'outcome':<8} {'changed':<8} folder")
    for r in rows[: args.limit]:
        changed = "" if r.get("outcome") == records.RUNNING else ("yes" if r.get("changed") else "no")
        print(f"{r.get('started', ''):<21} {r.get('name', ''):<16} {r.get('outcome', '?'):<8} {changed:<8} "
              f"{runs / r['folder']}")
    latest = runs / "latest"
    if latest.is_symlink():
        print(f"latest -> {os.readlink(latest)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="runbook", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("-f", "--parameters-file", action="append", default=[], metavar="YAML",
                       help="parameters from a YAML file (repeatable; later files win)")
        p.add_argument("-p", "--parameter", action="append", nargs=2, default=[], metavar=("NAME", "VALUE"),
                       help="one parameter (repeatable; wins over -f)")
        p.add_argument("--dry-run", action="store_true", help="show every changing command, run none")
        p.add_argument("--runs-dir", help="where run folders go (default $RUNBOOK_RUNS_DIR or the repository's runs/)")

    p = sub.add_parser("deploy", help="run sections 1-5 (notebooks/deploy.ipynb) into a run folder")
    common(p)
    p = sub.add_parser("run", help="run one notebook into a run folder")
    p.add_argument("notebook")
    common(p)
    p = sub.add_parser("runs", help="list the run folders, newest first")
    p.add_argument("--runs-dir")
    p.add_argument("-n", "--limit", type=int, default=50)
    sub.add_parser("lab-ui", help="start JupyterLab on the lab's parameters and print its URL", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lab-ui"]:
        from . import ui
        return ui.main(argv[1:]) or 0
    args = ap.parse_args(argv)
    import signal
    # SIGTERM (a CI timeout, systemd, kill) as Ctrl-C: while a notebook runs the engine passes it to
    # the kernel (the running cell fails, the records are written); otherwise it unwinds through
    # the finally blocks instead of killing the process where it stands.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # the notebook's own output, without papermill's per-cell banners
    logging.getLogger("papermill").addFilter(
        lambda r: not str(r.msg).startswith(("Executing Cell", "Ending Cell")))
    for noisy in ("traitlets", "asyncio", "paramiko", "invoke", "fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.command == "runs":
        return cmd_runs(args)
    params = load_params(args.parameters_file, args.parameter, args.dry_run)
    notebook = DEPLOY if args.command == "deploy" else args.notebook
    return execute(notebook, params, runs_dir=args.runs_dir)


def entry() -> None:
    """The `runbook` command: main(), then out without the interpreter's teardown (~0.15 s of
    module and thread clean-up after a run whose records are written and kernels stopped)."""
    import logging
    rc = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc or 0)


if __name__ == "__main__":
    entry()
