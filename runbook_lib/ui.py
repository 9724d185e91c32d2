"""`make lab-ui` / `runbook lab-ui`: the runbook step by step in JupyterLab.

    python -m runbook_lib.ui [--port 8888] [--no-lab]

Brings the local lab up (unless --no-lab), starts JupyterLab on 127.0.0.1 rooted
at notebooks/ with a random token, prints the URL of 00-start.ipynb and runs in
the foreground until Ctrl-C.  `launch()` is the same server as an object (tests).

JupyterLab's user settings here (a private settings dir, the user's own is not
touched): no news pop-up (it fetches from the internet), no autosave (the
notebooks on disk stay as shipped; File > Save still works), every cell kept in
the page (no windowing: Ctrl-F finds text in every cell).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
START = "00-start.ipynb"

SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


class UIError(RuntimeError):
    pass


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """preferred if nothing listens there, else a free port the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise UIError("no free TCP port on " + host)


def write_settings(directory: str | os.PathLike) -> pathlib.Path:
    """JupyterLab user settings (JUPYTERLAB_SETTINGS_DIR layout: <plugin id>.jupyterlab-settings)."""
    d = pathlib.Path(directory)
    for plugin, values in SETTINGS.items():
        pkg, _, name = plugin.rpartition("/")
        f = d / pkg / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values, indent=1) + "\n")
    return d


class JupyterLab:
    """A running JupyterLab server (our child process).  Use as a context manager or call stop()."""

    def __init__(self, proc: subprocess.Popen, url: str, token: str, port: int, workdir: pathlib.Path,
                 log_path: pathlib.Path, keep_workdir: bool = False):
        self.proc, self.base_url, self.token, self.port = proc, url, token, port
        self.workdir, self.log_path, self._keep = workdir, log_path, keep_workdir

    def url(self, notebook: str | None = START, workspace: str | None = None) -> str:
        """The URL that opens `notebook` (None: the launcher), token included.  workspace: a
        named JupyterLab workspace (a new name opens only this notebook, no restored tabs)."""
        base = f"lab/workspaces/{workspace}" if workspace else "lab"
        path = f"{base}/tree/{notebook}" if notebook else base
        return f"{self.base_url}{path}?token={self.token}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the server shuts its kernels down), then SIGKILL to its process group if it lingers."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the kernels go too
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        if not self._keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def launch(port: int | None = None, token: str | None = None, ip: str = "127.0.0.1",
           root_dir: str | os.PathLike = NOTEBOOKS, env: dict | None = None, timeout: float = 60.0,
           log_path: str | os.PathLike | None = None) -> JupyterLab:
    """Start JupyterLab and wait (bounded) until /api/status answers.  Returns a JupyterLab.

    env: extra environment for the server and its kernels (e.g. RUNBOOK_STATE_DIR)."""
    port = port or free_port(8888, ip)
    token = token or secrets.token_hex(24)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="runbook-lab-ui-"))
    write_settings(workdir / "settings")
    (workdir / "workspaces").mkdir()
    log = pathlib.Path(log_path) if log_path else workdir / "jupyterlab.log"
    e = dict(os.environ)
    e.update({"JUPYTERLAB_SETTINGS_DIR": str(workdir / "settings"),
              "JUPYTERLAB_WORKSPACES_DIR": str(workdir / "workspaces"),
              # the kernels' runbook_lib is this checkout's, whatever the cwd
              "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    e.update(env or {})
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", ip, "--port", str(port),
            f"--IdentityProvider.token={token}", "--allow-root", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={root_dir}", "--LabApp.news_url=None", "--ServerApp.open_browser=False",
            # checkpoints (JupyterLab makes one on open) in our scratch dir, not notebooks/.ipynb_checkpoints
            f"--FileCheckpoints.root_dir={workdir / 'checkpoints'}"]
    with open(log, "ab") as lf:
        proc = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e,
                                cwd=str(root_dir), start_new_session=True)
    lab = JupyterLab(proc, f"http://{ip}:{port}/", token, port, workdir, log, keep_workdir=bool(log_path))
    deadline = time.monotonic() + timeout
    status = f"{lab.base_url}api/status?token={token}"
    while True:
        if proc.poll() is not None:
            tail = lab.log_tail()
            lab.stop()
            raise UIError(f"JupyterLab exited (code {proc.returncode}) before answering on port {port}:\n{tail}")
        try:
            with urllib.request.urlopen(status, timeout=2) as r:
                if r.status == 200:
                    return lab
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            tail = lab.log_tail()
            lab.stop()
            raise UIError(f"JupyterLab did not answer {lab.base_url}api/status within {timeout:.0f} s:\n{tail}")
        time.sleep(0.25)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="runbook lab-ui",
                                 description="The runbook step by step in JupyterLab (foreground; Ctrl-C stops it).")
    ap.add_argument("--port", type=int, default=None, help="port (default 8888, or a free one if it is taken)")
    ap.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--no-lab", action="store_true",
                    help="do not bring the local lab up (you will point the notebooks at your own hosts)")
    a = ap.parse_args(argv)
    if not a.no_lab:
        from . import lab as _lab
        print("Bringing the local lab up (python -m runbook_lib.lab up) ...", flush=True)
        _lab.up()
    t0 = time.monotonic()
    try:
        jl = launch(port=a.port, ip=a.ip)
    except UIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nJupyterLab is up ({time.monotonic() - t0:.1f} s), rooted at {NOTEBOOKS}.\n"
          f"Open the start page:\n\n    {jl.url(START)}\n\n"
          f"Autosave is off: the notebooks on disk stay as shipped (File > Save to keep your changes).\n"
          f"Server log: {jl.log_path}\nCtrl-C stops JupyterLab and its kernels.", flush=True)
    try:
        while jl.alive():
            time.sleep(0.5)
        print(f"JupyterLab exited (code {jl.proc.returncode}); log tail:\n{jl.log_tail()}", file=sys.stderr)
        return jl.proc.returncode or 1
    except KeyboardInterrupt:
        print("\nStopping JupyterLab ...", flush=True)
        return 0
    finally:
        jl.stop()


if __name__ == "__main__":
    sys.exit(main())
