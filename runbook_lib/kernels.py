"""The kernels a run executes in, started before they are needed.

`runbook deploy` runs two kernels: deploy.ipynb's own, and the one every section runs in
(SectionKernel).  Each takes ~0.5 s to boot and papermill's import ~0.3 s, so the CLI starts
both before it imports papermill (bench/profile_deploy.py: that was 1.3 s in a row).  The deploy
notebook's kernel finds the section kernel the CLI started by $RUNBOOK_SECTION_KERNEL
("PID:CONNECTION_FILE") and attaches to it; run on its own (papermill, JupyterLab) it starts one.
A kernel is stopped by whoever started it, once idle and in the background: killed and reaped
(`kill`), since every reply is in by then and a polite shutdown costs 0.2-0.4 s of CPU.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import threading
import time

from jupyter_client import KernelManager

ENV = "RUNBOOK_SECTION_KERNEL"
# as nbclient starts its kernels: no IPython history database on disk
ARGS = ["--HistoryManager.hist_file=:memory:"]


def kernel_name(notebook) -> str:
    """The kernel a notebook declares (its kernelspec; ours all use python3)."""
    import pathlib
    spec = json.loads(pathlib.Path(notebook).read_text()).get("metadata", {}).get("kernelspec", {})
    return spec.get("name") or "python3"


# The section kernel keeps no output history (Out, _): IPython's reset() between sections then skips
# the gc.collect() that frees it (~25 ms a section); cell results are still displayed.
SECTION_ARGS = ["--InteractiveShell.cache_size=0"]


def start(kernel_name: str = "python3", cwd=None, stderr=None, extra=()) -> KernelManager:
    """A kernel process, started without waiting for it to be ready."""
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel(cwd=str(cwd) if cwd else None, stderr=stderr, extra_arguments=[*ARGS, *extra])
    return km


def wait_ready(kc, km=None, timeout: float = 60) -> None:
    """Until the kernel answers a kernel_info request on shell AND its iopub reaches us (a status
    message of that request: nbclient reads every cell's outputs from iopub).  jupyter_client's
    wait_for_ready does the same, then listens 0.2 s more to flush iopub: twice on a deploy's
    critical path.  Raises RuntimeError if the kernel dies or does not answer in time."""
    import zmq
    shell, iopub = kc.shell_channel, kc.iopub_channel
    poller = zmq.Poller()
    poller.register(shell.socket, zmq.POLLIN)
    poller.register(iopub.socket, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    msg_id, replied_at, heard, checked = kc.kernel_info(), None, False, time.monotonic()
    while True:
        poller.poll(20)
        while shell.msg_ready():  # every message queued, not one per wake-up
            if shell.get_msg(timeout=0)["parent_header"].get("msg_id") == msg_id:
                replied_at = time.monotonic()
        while iopub.msg_ready():
            heard |= iopub.get_msg(timeout=0)["parent_header"].get("msg_id") == msg_id
        now = time.monotonic()
        if replied_at is not None and heard:
            return
        if replied_at is not None and now - replied_at > 0.1:
            # up, but its iopub went out before our subscription took: ask again
            msg_id, replied_at, heard = kc.kernel_info(), None, False
        if now - checked > 0.5:
            checked = now
            if km is not None and not km.is_alive():
                raise RuntimeError("the kernel died before it was ready (see its log)")
        if now >= deadline:
            raise RuntimeError(f"the kernel did not answer within {timeout:.0f} s")


def pids(km) -> tuple[int | None, int | None]:
    """(process group, pid) of a kernel, for a signal: the provisioner's, or an attached kernel's pid."""
    prov = getattr(km, "provisioner", None) if km is not None else None
    pgid, pid = getattr(prov, "pgid", None), getattr(prov, "pid", None)
    return pgid, pid or getattr(km, "attached_pid", None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AttachedKernelManager(KernelManager):
    """A kernel another process started (its pid and connection file).  nbclient uses it as a
    running kernel of its own (has_kernel), interrupts go to its pid as a signal, and shutting
    it down is left to the process that started it."""

    attached_pid: int = 0

    @property
    def has_kernel(self) -> bool:
        return bool(self.attached_pid) and _alive(self.attached_pid)

    def is_alive(self) -> bool:  # nbclient: ensure_async(km.is_alive())
        return self.has_kernel

    def interrupt_kernel(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.attached_pid, signal.SIGINT)

    def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
        pass  # not ours

    def cleanup_resources(self, restart: bool = False) -> None:
        pass


def attached(spec: str | None = None) -> AttachedKernelManager | None:
    """The kernel $RUNBOOK_SECTION_KERNEL names, when it still runs."""
    spec = spec if spec is not None else os.environ.get(ENV, "")
    pid, _, cf = spec.partition(":")
    if not (pid.isdigit() and cf and os.path.exists(cf) and _alive(int(pid))):
        return None
    km = AttachedKernelManager(connection_file=cf)
    km.load_connection_file()
    km.attached_pid = int(pid)
    return km


def _literal(params: dict) -> str:
    """Python source that rebuilds the parameters in the kernel (JSON inside a str literal)."""
    return f"__import__('json').loads({json.dumps(params, default=str)!r})"


class SectionKernel:
    """The one kernel every section of a deploy runs in, each section in a fresh namespace.

    Started (or attached to, see the module) when the deploy starts; one client whose channels
    stay open from section to section.  Before each section IPython's reset(new_session=True)
    empties the user namespace: no variable of one section reaches the next, while imported
    modules, SSH logins (host._pool) and the secrets registered for masking stay.  That saves,
    per section, a kernel start (~0.5 s of CPU), a client's ready wait (~0.2 s), the imports and
    a login per host.  The kernel inherits its starter's environment (run folder, mask file)."""

    def __init__(self, cwd, log_path=None, kernel_name: str = "python3", *, km=None):
        self.cwd = str(cwd)
        self.owner = km is None
        self.log = open(log_path, "ab") if self.owner and log_path else None
        self.km = km if km is not None else start(kernel_name, self.cwd, stderr=self.log, extra=SECTION_ARGS)
        self.kc = self.km.client()
        self.kc.allow_stdin = False  # as nbclient's own clients: input() fails instead of hanging
        self.kc.start_channels()
        self._ready = False
        self._stopper = None

    @classmethod
    def attach_or_start(cls, cwd, log_path, kernel_name: str = "python3") -> "SectionKernel":
        km = attached()
        return cls(cwd, km=km) if km is not None else cls(cwd, log_path, kernel_name)

    @property
    def pid(self) -> int | None:
        return pids(self.km)[1]

    def _ready_wait(self):
        if not self._ready:
            wait_ready(self.kc, self.km)
            self._ready = True

    def _silent(self, code: str, wait: bool = True, timeout: float = 60, expressions: dict | None = None):
        if wait:
            self._ready_wait()
        # else sent at once, even to a kernel still booting: the shell socket queues it, the kernel
        # runs it first, and whoever waits next (wait_ready, _silent) skips its reply
        msg_id = self.kc.execute(code, silent=True, store_history=False, allow_stdin=False,
                                 user_expressions=expressions or {})
        if not wait:
            return None  # its reply is skipped by whoever waits next (they match their own msg_id)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        c = reply["content"]
        if c.get("status") != "ok":
            raise RuntimeError(f"section kernel: {c.get('ename')}: {c.get('evalue')}")
        return c.get("user_expressions") or {}

    def call(self, code: str, timeout: float = 120):
        """Run code that leaves a JSON-able value in `_runbook_out`; returns that value."""
        ex = self._silent(code, timeout=timeout, expressions={"out": "__import__('json').dumps(_runbook_out)"})
        out = ex.get("out", {})
        if out.get("status") != "ok":
            raise RuntimeError(f"section kernel: {out.get('ename')}: {out.get('evalue')}")
        return json.loads(ast.literal_eval(out["data"]["text/plain"]))

    def prewarm(self, params: dict | None = None) -> None:
        """prewarm_here in the kernel, sent at once (it runs as soon as the kernel is up)."""
        self._silent("import runbook_lib.kernels\nrunbook_lib.kernels.prewarm_here("
                     f"{'None' if params is None else _literal(params)})", wait=False)

    def check_hosts(self, params: dict) -> dict:
        """ctx.check_hosts() run in this kernel, so that the sections reuse its logins; a refusal
        is raised here as the RunbookError the kernel raised (message and hint)."""
        out = self.call("import runbook_lib.context\n_runbook_out = runbook_lib.context.check_hosts_report("
                        f"{_literal(params)})")
        if out.get("error"):
            from . import errors
            cls = getattr(errors, out["error"], None)
            if not (isinstance(cls, type) and issubclass(cls, errors.RunbookError)):
                cls = errors.RunbookError
            e = cls.__new__(cls)
            errors.RunbookError.__init__(e, out["message"], out.get("hint") or None)
            if out.get("host"):
                e.host = out["host"]
            raise e
        return out["access"]

    def start_versions(self, params: dict) -> None:
        """records.tool_versions in a thread of this kernel, over its logins (beside section 1)."""
        self._silent("import runbook_lib.records\nrunbook_lib.records.versions_in_background("
                     f"{_literal(params)})", wait=False)

    def versions(self, timeout: float = 10) -> dict | None:
        """What start_versions found; None when the kernel is gone or does not answer."""
        try:
            if not self.km.is_alive():
                return None
            return self.call(f"import runbook_lib.records\n_runbook_out = runbook_lib.records.versions_result({timeout})",
                             timeout=timeout + 5)
        except Exception:
            return None

    def fresh(self) -> None:
        """An empty namespace (and execution count 1) for the next section."""
        self._silent(f"import os as _os; _os.chdir({self.cwd!r}); get_ipython().reset(new_session=True)")

    def stop(self, wait: bool = False) -> None:
        """Close the client, and shut the kernel down in the background if we started it (or
        now, wait=True); idempotent."""
        def _stop():
            try:
                self.kc.stop_channels()
                if self.owner:
                    # idle, every reply received: a kill loses nothing, and spares the ~0.2 s of CPU
                    # a graceful exit takes on the cores the run shares with its hosts
                    kill(self.km)
            except Exception:  # already gone; stop(wait=True) at the end of the run joins this
                pass
            finally:
                if self.log:
                    self.log.close()
        if self._stopper is None:
            self._stopper = threading.Thread(target=_stop, name="kernel-shutdown", daemon=True)
            self._stopper.start()
        if wait:
            self._stopper.join(10)

    def scrub_log(self) -> None:
        """The kernel's own stderr, with every secret this process knows masked (after stop)."""
        from . import masking
        if self.log is None:
            return
        import pathlib
        with contextlib.suppress(OSError):
            path = pathlib.Path(self.log.name)
            path.write_text(masking.mask(path.read_text(errors="replace")))


SECTION_MODULES = ("runbook_lib.rgw", "runbook_lib.accounts", "runbook_lib.certs", "runbook_lib.registry",
                   "runbook_lib.push")


def prewarm_here(params: dict | None = None) -> None:
    """In the section kernel, while the deploy notebook boots: the modules the sections import,
    in a thread, beside the SSH logins and become checks of the hosts the parameters name (the two
    overlap: a login mostly waits on the network).  A refusal is left to the deploy's host check."""
    import importlib
    t = threading.Thread(target=lambda: [importlib.import_module(m) for m in SECTION_MODULES], daemon=True)
    t.start()
    if params is not None:
        from .context import Context
        with contextlib.suppress(Exception):
            Context("deploy", params).check_hosts()
    t.join()


def kill(km) -> None:
    """A kernel we started, killed and reaped at once, then shut down in jupyter_client's books
    (its shutdown_kernel(now=True) alone polls for the exit every 0.1 s: ~0.11 s a kernel)."""
    pgid, pid = pids(km)
    proc = getattr(getattr(km, "provisioner", None), "process", None)
    with contextlib.suppress(OSError):
        if pgid:
            os.killpg(pgid, signal.SIGKILL)
        elif pid:
            os.kill(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.wait(5)
    km.shutdown_kernel(now=True)  # finds it gone: no wait; removes its connection file


def stop_in_background(km) -> threading.Thread:
    """A kernel we started and no longer use, stopped in a thread (join it before exiting): killed,
    as SectionKernel.stop does."""
    def _stop():
        with contextlib.suppress(Exception):
            kill(km)
    t = threading.Thread(target=_stop, name="kernel-shutdown", daemon=True)
    t.start()
    return t
