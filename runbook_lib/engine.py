"""papermill engine `runbook`: a second line of defence against leaked secrets,
and a run folder for every run.

    papermill --engine runbook notebooks/01-rgw.ipynb out.ipynb -f params/lab.yaml

papermill has no redaction: `-p` values land in the injected cell and in
`metadata.papermill.parameters`, and outputs are saved as they come.  This engine
scrubs every known secret (-> ****) from a copy of the notebook before EVERY save,
and scrubs the notebook it returns (papermill's final write uses it).

Known secrets: the values the kernel registers (masking.register appends them to
$RUNBOOK_MASK_FILE, a fresh 0600 file in the state dir the engine creates before the
kernel starts), every file in <state_dir>/secrets/, the secret environment
variables (REGISTRY_PASSWORD), and what this process registered itself.

When $RUNBOOK_RUN_DIR is unset the engine makes a run folder (records.Run) and puts
the executed notebook, its HTML and run.json there.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pathlib
import time

# Importing papermill.engines loads its entry points, this module among them: when this
# module is imported first, that finds it half-initialized.  A placeholder now, and the
# real class registered at the end of this module.
RunbookEngine = None

from papermill.clientwrap import PapermillNotebookClient  # noqa: E402
from papermill.engines import NBClientEngine, NotebookExecutionManager, papermill_engines  # noqa: E402
from papermill.utils import merge_kwargs, remove_args  # noqa: E402

from . import masking, records  # noqa: E402
from .context import ENV_SECRETS, notebook_state_dir  # noqa: E402
from .masking import MASK_ENV, SECRET_PARAM_RE, mask_session, env_vars as _env  # noqa: E402,F401
# Lines of a multi-line secret file (a PEM key) shorter than this are not masked alone.
_MIN_LINE = 16


# -- the secrets we know ------------------------------------------------------------------------
def _forms(value: str) -> set[str]:
    import json
    out = {value, json.dumps(value)[1:-1]} if len(value) >= masking.MIN_LEN else set()
    value = value.strip()
    if len(value) < masking.MIN_LEN:
        return out
    out |= {value, json.dumps(value)[1:-1]}
    if "\n" in value:  # a PEM key: each body line on its own too
        for line in value.splitlines():
            line = line.strip()
            if len(line) >= _MIN_LINE and not line.startswith("-----"):
                out.add(line)
    return out


def known_secrets(state_dir: str | None = None, mask_file: str | None = None) -> list[str]:
    """Every secret value the engine knows, longest first."""
    vals: set[str] = set(masking.secrets())
    mask_file = mask_file or os.environ.get(MASK_ENV)
    if mask_file:
        for v in masking.load_file(mask_file):
            vals |= _forms(v)
    if state_dir:
        sdir = pathlib.Path(state_dir) / "secrets"
        if sdir.is_dir():
            for f in sdir.rglob("*"):
                if f.is_file() and not f.name.endswith(".tmp"):
                    try:
                        vals |= _forms(f.read_text(errors="replace"))
                    except OSError:
                        continue
    for env in ENV_SECRETS.values():
        if os.environ.get(env):
            vals |= _forms(os.environ[env])
    return sorted((v for v in vals if len(v) >= masking.MIN_LEN), key=len, reverse=True)


# -- scrubbing ----------------------------------------------------------------------------------
def _scrub_str(s: str, values) -> str:
    for v in values:
        if v in s:
            s = s.replace(v, masking.MASK)
    return s


def _scrub(obj, values):
    """A scrubbed copy of a notebook (or any JSON-like value)."""
    if isinstance(obj, str):
        return _scrub_str(obj, values)
    if isinstance(obj, dict):
        out = obj.__class__()
        for k, v in obj.items():
            out[_scrub_str(k, values) if isinstance(k, str) else k] = _scrub(v, values)
        return out
    if isinstance(obj, list):
        items = [_scrub(v, values) for v in obj]
        if len(items) > 1 and all(isinstance(x, str) for x in items):
            # split text (source lines): a secret could straddle two items; only then
            # re-split (a traceback's items are not newline-terminated: keep them as they are)
            joined = "".join(items)
            clean = _scrub_str(joined, values)
            if clean != joined:
                return clean.splitlines(keepends=True)
        return items
    return obj


def _coalesce_streams(outputs: list) -> list:
    """Adjacent stream outputs of one name merged (a secret printed in two chunks)."""
    out = []
    for o in outputs:
        if (out and o.get("output_type") == "stream" and out[-1].get("output_type") == "stream"
                and out[-1].get("name") == o.get("name")):
            prev = out[-1]
            t1 = prev["text"] if isinstance(prev["text"], str) else "".join(prev["text"])
            t2 = o["text"] if isinstance(o["text"], str) else "".join(o["text"])
            prev["text"] = t1 + t2
        else:
            out.append(copy.copy(o))
    return out


def scrub_notebook(nb, values=None, state_dir: str | None = None):
    """A copy of nb with every known secret replaced by ****: cell sources (the injected
    parameters cell), outputs (text, data, tracebacks, evalue) and metadata."""
    values = known_secrets(state_dir) if values is None else values
    nb = copy.deepcopy(nb)
    for cell in nb.get("cells", []):
        if cell.get("outputs"):
            cell["outputs"] = _coalesce_streams(cell["outputs"])
    return _scrub(nb, values) if values else nb


def scrub_in_place(nb, values) -> None:
    """Scrub the live notebook object (the one the engine returns)."""
    clean = scrub_notebook(nb, values)
    for key in list(nb.keys()):
        if key not in clean:
            del nb[key]
    for key, v in clean.items():
        nb[key] = v


# While cells succeed, the executed notebook is saved at most this often (papermill saves it at the
# start and the end of every cell: ~100 scrubbed copies per deploy).  A failed cell, an interrupt and
# the end of the notebook are always saved at once; this bounds only what a SIGKILL can lose.
AUTOSAVE_SECONDS = 5.0


class ScrubbingExecutionManager(NotebookExecutionManager):
    """papermill's manager whose every save writes a scrubbed copy; saves at the end, on a failed
    cell, and every AUTOSAVE_SECONDS in between (per_cell=True: papermill's save per cell)."""

    def __init__(self, nb, *, secrets_state_dir: str | None = None, mask_file: str | None = None,
                 per_cell: bool = False, **kw):
        self.secrets_state_dir = secrets_state_dir
        self.mask_file = mask_file
        self.per_cell = per_cell
        self._hold = False
        super().__init__(nb, **kw)

    def secret_values(self):
        return known_secrets(self.secrets_state_dir, self.mask_file)

    def save(self, **kwargs):
        nb = kwargs.get("nb")
        if nb:
            self.nb = nb
        if self._hold:
            return
        if self.output_path:
            from papermill.iorw import write_ipynb
            write_ipynb(scrub_notebook(self.nb, self.secret_values()), self.output_path)
        self.last_save_time = self.now()

    @contextlib.contextmanager
    def _held(self):
        self._hold = not self.per_cell
        try:
            yield
        finally:
            self._hold = False

    def cell_start(self, cell, cell_index=None, **kwargs):
        with self._held():
            super().cell_start(cell, cell_index, **kwargs)
        if not self.per_cell:
            self._due()

    def cell_complete(self, cell, cell_index=None, **kwargs):
        with self._held():
            super().cell_complete(cell, cell_index, **kwargs)
        if self.per_cell:
            return
        if cell.get("metadata", {}).get("papermill", {}).get("exception"):
            self.save()  # the failing cell, with its traceback, before anything else happens
        else:
            self._due()

    def _due(self):
        if (self.now() - self.last_save_time).total_seconds() >= AUTOSAVE_SECONDS:
            self.save()


class ScrubbingClient(PapermillNotebookClient):
    """--log-output and --stdout-file/--stderr-file see scrubbed text only."""

    def _values(self):
        return self.nb_man.secret_values() if hasattr(self.nb_man, "secret_values") else known_secrets()

    def log_output_message(self, output):
        # streams are logged by whole lines: a secret printed in two chunks is masked too
        if output.get("output_type") == "stream":
            buf = getattr(self, "_line_buf", {})
            self._line_buf = buf
            text = buf.pop(output.name, "") + "".join(output.text)
            head, nl, tail = text.rpartition("\n")
            if tail:
                buf[output.name] = tail
            if not nl:
                return None
            output = copy.deepcopy(output)
            output.text = head + nl
        return super().log_output_message(_scrub(copy.deepcopy(output), self._values()))

    def _flush_lines(self):
        import nbformat
        for name, text in list(getattr(self, "_line_buf", {}).items()):
            self._line_buf.pop(name, None)
            super().log_output_message(_scrub(nbformat.v4.new_output("stream", name=name, text=text),
                                              self._values()))

    interrupted = None  # the signal forward_interrupts passed on to the kernel

    def execute_cell(self, cell, *args, **kwargs):
        if self.interrupted is not None and cell.get("cell_type") == "code":
            # the interrupt reached the kernel between two cells (an idle kernel ignores it): this
            # cell does not run, and fails as the interrupted one, so nothing runs after it
            import nbformat
            from nbclient.exceptions import CellExecutionError
            why = f"signal {self.interrupted} before this cell ran; no cell after it ran"
            cell.setdefault("outputs", []).append(nbformat.v4.new_output(
                "error", ename="KeyboardInterrupt", evalue=why, traceback=[f"KeyboardInterrupt: {why}"]))
            raise CellExecutionError(f"KeyboardInterrupt: {why}", "KeyboardInterrupt", why)
        try:
            return super().execute_cell(cell, *args, **kwargs)
        finally:
            self._flush_lines()


@contextlib.contextmanager
def forward_interrupts(client):
    """While a notebook runs, SIGINT or SIGTERM to this process interrupts the notebook's kernel
    instead of tearing down the client: the running cell fails with KeyboardInterrupt, papermill
    marks it and runs no further cell, and the notebook, its HTML and run.json are written as for
    any failure.  (A deploy's kernel does the same for its section's kernel, so the interrupt
    reaches the cell that is running.)  A second signal stops waiting (KeyboardInterrupt here)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    count = [0]

    def forward(signum, frame):
        count[0] += 1
        client.interrupted = signum
        from .kernels import pids
        pgid, pid = pids(client.km)
        if count[0] == 1 and (pgid or pid):
            # a plain signal: no event loop call from a handler that may run inside one
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGINT) if pgid else os.kill(pid, signal.SIGINT)
                return
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def notebook_parameters(nb) -> dict:
    """The parameters a run used: the parameters cell's defaults, overridden by the injected ones."""
    import ast
    out = {}
    try:
        from papermill.inspection import _infer_parameters
        for p in _infer_parameters(nb):
            try:
                out[p.name] = ast.literal_eval(p.default)
            except (ValueError, SyntaxError):
                out[p.name] = p.default
    except Exception:  # records only: never fail a run over it
        pass
    out.update(nb.metadata.get("papermill", {}).get("parameters") or {})
    return out


def _register_secret_params(params: dict, mask_file: str) -> None:
    import json
    values = [v for k, v in params.items() if SECRET_PARAM_RE.search(k) and isinstance(v, str)
              and len(v) >= masking.MIN_LEN]
    if values:
        with open(mask_file, "a") as f:
            for v in values:
                f.write(json.dumps(v) + "\n")


def section_name(input_path) -> str:
    if not input_path or not isinstance(input_path, (str, os.PathLike)):
        return "notebook"
    name = os.path.basename(str(input_path))
    return name[:-6] if name.endswith(".ipynb") else name


# -- the engine -------------------------------------------------------------------------------------
class RunbookEngine(NBClientEngine):
    """papermill engine: scrub secrets before every save; a run folder for every run."""

    last_run: "records.Run | None" = None

    @classmethod
    def execute_notebook(cls, nb, kernel_name, output_path=None, progress_bar=True, log_output=False,
                         autosave_cell_every=30, **kwargs):
        name = section_name(kwargs.get("input_path"))
        params = notebook_parameters(nb)
        sdir = notebook_state_dir(params)
        own_run = records.Run.current() is None
        with mask_session(sdir) as mask_file:
            _register_secret_params(params, mask_file)
            # deploy's records default to the repository's runs/, a single notebook's to ./runs
            run = records.Run.create(name, params=_scrub(params, known_secrets(sdir, mask_file)),
                                     prefer_repo=name == "deploy") if own_run else records.Run.current()
            cls.last_run = run
            nb_man = ScrubbingExecutionManager(nb, secrets_state_dir=sdir, mask_file=mask_file,
                                               output_path=output_path, progress_bar=progress_bar,
                                               log_output=log_output, autosave_cell_every=autosave_cell_every)
            env = run.env() if own_run else {}
            t0 = time.monotonic()
            failure = None
            with _env(**env):
                nb_man.notebook_start()
                try:
                    cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
                except BaseException as e:
                    failure = f"{type(e).__name__}: {e}"
                    raise
                finally:
                    nb_man.cleanup_pbar()
                    nb_man.notebook_complete()
                    values = nb_man.secret_values()
                    scrub_in_place(nb_man.nb, values)
                    if own_run:
                        cls._record(run, name, nb_man.nb, _scrub(params, values), time.monotonic() - t0,
                                    _scrub_str(failure, values) if failure else None)
        return nb_man.nb

    @classmethod
    def _record(cls, run, name, nb, params, duration, failure):
        """Executed notebook (with papermill's error markers) + HTML + run.json."""
        params = {**run.data().get("parameters", {}), **params}
        import nbformat
        from papermill.exceptions import PapermillExecutionError
        from papermill.execute import raise_for_execution_errors

        path = run.path / f"{name}.ipynb"
        error = failure
        try:
            raise_for_execution_errors(copy.deepcopy(nb), str(path))  # writes path only on error
            nbformat.write(nb, str(path))
        except PapermillExecutionError as e:
            error = error or f"{e.ename}: {e.evalue}"
        except Exception as e:  # never let recording hide the run's own outcome
            error = error or f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                nbformat.write(nb, str(path))
        html = None
        with contextlib.suppress(Exception):
            html = run.render_html(path)
        run.add_notebook(name, ipynb=path, html=html, status="failed" if error else "completed",
                         duration=duration, error=error)
        with contextlib.suppress(Exception):
            run.finish(params=params, error=error)

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                 stderr_file=None, start_timeout=60, execution_timeout=None, **kwargs):
        # as NBClientEngine, with the scrubbing client and streams merged per cell;
        # kernel_log: a file for the kernel process's own stderr (scrubbed after)
        kernel_log = kwargs.pop("kernel_log", None)
        kwargs = remove_args(["input_path"], **kwargs)
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
        final_kwargs = merge_kwargs(
            safe_kwargs,
            timeout=execution_timeout if execution_timeout else kwargs.get("timeout"),
            startup_timeout=start_timeout,
            kernel_name=kernel_name,
            log=__import__("papermill.log", fromlist=["logger"]).logger,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
            coalesce_streams=True,
        )
        kc = final_kwargs.pop("kc", None)
        client = ScrubbingClient(nb_man, **final_kwargs)
        if final_kwargs.get("km") is not None:
            # a kernel the caller started (deploy's section kernel): the caller also shuts it down;
            # with its client too (kc), whose channels stay open for the next notebook
            client.kc = kc
            try:
                with forward_interrupts(client):
                    return client.execute()
            finally:
                if kc is None and client.kc is not None:
                    client.kc.stop_channels()
        if not kernel_log:
            with forward_interrupts(client):
                return client.execute()
        try:
            with open(kernel_log, "ab") as f, forward_interrupts(client):
                return client.execute(stderr=f)
        finally:
            with contextlib.suppress(OSError):
                text = pathlib.Path(kernel_log).read_text(errors="replace")
                pathlib.Path(kernel_log).write_text(_scrub_str(text, nb_man.secret_values()))


papermill_engines.register("runbook", RunbookEngine)
