"""Where the lab lives, and process, mount and command helpers for `runbook_lib.lab`
(standard library only).

Everything here works from the root namespaces and reads /proc directly, so it also finds
the processes of an earlier lab that ran from another folder or whose runner died.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------- the lab's places and addresses

LAB_DIR = Path("/var/lib/runbook-lab")
RUN_DIR = Path("/run/runbook-lab")          # control dockerd's exec root and pidfile
SSH_DIR = LAB_DIR / "ssh"
SSH_KEY = SSH_DIR / "id_ed25519"
KNOWN_HOSTS = SSH_DIR / "known_hosts"
AUTHORIZED_KEYS = SSH_DIR / "authorized_keys"
HOSTKEY_DIR = SSH_DIR / "hostkeys"
HOSTS_DIR = LAB_DIR / "hosts"
ROOTFS_DIR = LAB_DIR / "rootfs"             # host images (kept across down)
APT_CACHE_DIR = LAB_DIR / "apt-cache"       # the apt proxy's cache (kept across down)
PROXY_DIR = LAB_DIR / "proxy"               # the apt proxy's config, logs, pid
CONTROL_DIR = LAB_DIR / "control"
IMAGES_DIR = LAB_DIR / "images"
ETC_HOSTS = LAB_DIR / "etc-hosts"           # legacy hosts bind-mount it
LOCK_FILE = Path("/run/lock/runbook-lab.lock")

BRIDGE = "rblab0"
NETWORK = ipaddress.ip_network("198.18.0.0/24")
CONTROL_ADDR = "198.18.0.1"
CONTROL_NAME = "control"
NS_PREFIX = "rbl-"
CGROUP_PREFIX = "lab-"
PROXY_PORT = 3142
SSH_USER = "k8s"

# ---------------------------------------------------------------- progress lines

_print_lock = threading.Lock()


def log(msg: str):
    with _print_lock:
        try:
            print(f"[lab] {msg}", file=sys.stdout, flush=True)
        except (OSError, ValueError):  # closed/broken stdout must not break the lab
            pass


@contextlib.contextmanager
def step(what: str):
    """Print how long `what` took (`[lab] what   1.23 s`)."""
    t = time.monotonic()
    try:
        yield
    except Exception:
        log(f"{what:<44} FAILED after {time.monotonic() - t:.2f} s")
        raise
    log(f"{what:<44} {time.monotonic() - t:6.2f} s")


# A clean environment for everything started inside a lab host (like an ssh login gets).
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
}


class LabError(RuntimeError):
    """A lab step failed.  `cmd` and `stderr` are set when a command failed."""

    def __init__(self, message: str, cmd: list[str] | None = None, stderr: str | None = None,
                 returncode: int | None = None):
        self.cmd = cmd
        self.stderr = stderr
        self.returncode = returncode
        super().__init__(message)


def _text(data) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


def run(argv: list[str], *, check: bool = True, input=None, stdin=None, timeout: float | None = 120,
        env: dict | None = None, what: str | None = None) -> subprocess.CompletedProcess:
    """Run argv, capture its output (text, unless `input` is bytes).  Failure -> LabError."""
    argv = [str(a) for a in argv]
    text = not isinstance(input, bytes)
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    try:
        cp = subprocess.run(argv, input=input, stdin=stdin, capture_output=True, text=text,
                            timeout=timeout, env=env)
    except FileNotFoundError as e:
        raise LabError(f"command not found: {argv[0]} ({e})", cmd=argv) from None
    except subprocess.TimeoutExpired as e:
        err = _text(e.stderr).strip() or _text(e.stdout).strip()
        raise LabError(f"timed out after {timeout:g} s: {shlex.join(argv)}" + (f"\n{err}" if err else ""),
                       cmd=argv, stderr=err) from None
    if check and cp.returncode != 0:
        err = _text(cp.stderr).strip() or _text(cp.stdout).strip()
        head = f"{what}: " if what else ""
        raise LabError(f"{head}command failed (exit {cp.returncode}): {shlex.join(argv)}"
                       + (f"\n{err}" if err else ""), cmd=argv, stderr=err, returncode=cp.returncode)
    return cp


def wait_for(pred, timeout: float, what: str, interval: float = 0.05, detail=None):
    """Poll pred() until it returns something truthy; LabError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            r = pred()
            if r:
                return r
        except LabError:
            raise
        except Exception as e:  # noqa: BLE001 - keep polling, report the last one
            last_exc = e
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:g} s waiting for {what}"
            if last_exc is not None:
                msg += f" (last error: {last_exc})"
            if detail is not None:
                try:
                    d = detail()
                except Exception as e:  # noqa: BLE001
                    d = f"(could not collect details: {e})"
                if d:
                    msg += "\n" + d
            raise LabError(msg)
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    pid: int
    ppid: int
    state: str
    comm: str
    cmdline: list[str] = field(default_factory=list)
    netns: int | None = None
    mntns: int | None = None
    rss: int = 0  # bytes
    pidns: int | None = None
    starttime: int = 0  # clock ticks after boot (with pid: a process's identity)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _ns_ino(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
    lp, rp = stat.index("("), stat.rindex(")")
    comm = stat[lp + 1:rp]
    rest = stat[rp + 2:].split()
    return Proc(pid=pid, ppid=int(rest[1]), state=rest[0], comm=comm, cmdline=cmdline,
                netns=_ns_ino(pid, "net"), mntns=_ns_ino(pid, "mnt"), rss=rss,
                pidns=_ns_ino(pid, "pid"), starttime=int(rest[19]))


def processes() -> dict[int, Proc]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            p = read_proc(int(d))
            if p is not None:
                out[p.pid] = p
    return out


def alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (reaps it when it is our own child)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def descendants(roots: set[int], table: dict[int, Proc]) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def _self_and_ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        p = read_proc(pid)
        if p is None:
            break
        pid = p.ppid
    out.add(1)
    return out


def kill_all(pids: set[int], timeout: float = 10.0, what: str = "processes") -> int:
    """SIGKILL pids (never ourselves or our ancestors) and wait until they are gone."""
    pids = set(pids) - _self_and_ancestors()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = {p for p in left if alive(p)}
    if left:
        desc = ", ".join(f"{p} ({(read_proc(p) or Proc(p, 0, '?', '?')).comm})" for p in sorted(left))
        raise LabError(f"{what} did not die within {timeout:g} s after SIGKILL: {desc}")
    return len(pids)


# ---------------------------------------------------------------- mounts


def _unescape(path: str) -> str:
    return (path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mounts_under(prefixes: list[str]) -> list[str]:
    """Mount points (root mount namespace) at or under any of prefixes, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            for pre in prefixes:
                pre = pre.rstrip("/")
                if mp == pre or mp.startswith(pre + "/"):
                    found.append(mp)
                    break
    return sorted(set(found), key=lambda m: (-m.count("/"), m))


def umount_all(prefixes: list[str]) -> list[str]:
    done = []
    for _ in range(5):  # stacked mounts need several passes
        mps = mounts_under(prefixes)
        if not mps:
            break
        for mp in mps:
            run(["umount", "-l", mp], check=False)
            done.append(mp)
    left = mounts_under(prefixes)
    if left:
        raise LabError(f"could not unmount: {', '.join(left)}")
    return done
