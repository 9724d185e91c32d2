"""The lab's apt proxy: Debian's apt-cacher-ng on the control node, CONTROL_ADDR:3142.

Run by hand (the package's own service does not start on these machines), with a private copy
of /etc/apt-cacher-ng whose backends are the mirrors of this machine's debian.sources (read at
run time: the package's default backend list names a mirror that may not resolve here).
The cache (APT_CACHE_DIR) is kept across `down`, so hosts of a new lab install from it.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from .proc import (APT_CACHE_DIR, CLEAN_ENV, CONTROL_ADDR, PROXY_DIR, PROXY_PORT, LabError, alive, read_proc,
                   wait_for)
from .rootfs import mirror_uris

CONF_SRC = Path("/etc/apt-cacher-ng")
BIN = "/usr/sbin/apt-cacher-ng"
CONF_DIR = PROXY_DIR / "conf"
LOG_DIR = PROXY_DIR / "log"
PID_FILE = PROXY_DIR / "pid"
SOCKET = PROXY_DIR / "socket"
TRANSFER_LOG = LOG_DIR / "apt-cacher.log"


def _listening(timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((CONTROL_ADDR, PROXY_PORT), timeout=timeout):
            return True
    except OSError:
        return False


def pid() -> int | None:
    """The running proxy's pid, or None."""
    try:
        p = int(PID_FILE.read_text())
    except (OSError, ValueError):
        return None
    pr = read_proc(p)
    if pr is None or not alive(p) or pr.comm != "apt-cacher-ng" or str(CONF_DIR) not in " ".join(pr.cmdline):
        return None
    return p


def running() -> bool:
    return pid() is not None and _listening()


def _write_conf():
    shutil.rmtree(CONF_DIR, ignore_errors=True)
    shutil.copytree(CONF_SRC, CONF_DIR, symlinks=True)
    uris = mirror_uris()
    debian = [u for u, suites in uris if not any(s.endswith("-security") for s in suites)]
    security = [u for u, suites in uris if any(s.endswith("-security") for s in suites)]
    if not debian:
        raise LabError("no Debian mirror in this machine's sources: the apt proxy has no backend")
    (CONF_DIR / "backends_debian").write_text("".join(u + "/\n" for u in debian))
    conf = (CONF_DIR / "acng.conf").read_text()
    if security:
        # the security archive's backend: this machine's own, whatever the package's list says
        # (its URL prefixes are kept, ours added; only the backend list after ';' is replaced)
        strip = lambda u: re.sub(r"^https?://", "", u)  # noqa: E731
        ours = " ".join(strip(u) for u in security)
        m = re.search(r"^Remap-secdeb:([^;\n]*)(;[^\n]*)?$", conf, flags=re.M)
        if m:
            conf = conf[:m.start()] + f"Remap-secdeb:{m.group(1).rstrip()} {ours} ; {ours}" + conf[m.end():]
        else:
            conf += f"Remap-secdeb: {ours} /debian-security ; {ours}\n"
    (CONF_DIR / "acng.conf").write_text(conf)


def start() -> int:
    """Start the proxy (bridge must be up).  Returns its pid; no-op when it already runs."""
    p = pid()
    if p and _listening():
        return p
    stop()
    for d in (PROXY_DIR, APT_CACHE_DIR, LOG_DIR):
        d.mkdir(parents=True, exist_ok=True)
    _write_conf()
    log = PROXY_DIR / "apt-cacher-ng.out"
    log.unlink(missing_ok=True)
    with open(log, "ab") as lf:
        proc = subprocess.Popen(
            [BIN, "-c", str(CONF_DIR), "ForeGround=1", f"BindAddress={CONTROL_ADDR}", f"Port={PROXY_PORT}",
             f"CacheDir={APT_CACHE_DIR}", f"LogDir={LOG_DIR}", f"SocketPath={SOCKET}", f"PidFile={PROXY_DIR / 'acng.pid'}",
             "ExThreshold=0", "VerboseLog=1"],
            stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True,
            close_fds=True, env=CLEAN_ENV)
    PID_FILE.write_text(str(proc.pid))

    def up():
        if proc.poll() is not None:
            raise LabError(f"apt-cacher-ng exited with {proc.returncode}: {log.read_text(errors='replace')[-500:]}")
        return _listening()
    wait_for(up, 15, f"apt-cacher-ng on {CONTROL_ADDR}:{PROXY_PORT}")
    if "Couldn't bind" in log.read_text(errors="replace"):
        proc.kill()
        raise LabError(f"apt-cacher-ng could not bind {CONTROL_ADDR}:{PROXY_PORT}: another process listens on "
                       f"port {PROXY_PORT} (the package's own service?  stop it: ss -ltnp | grep {PROXY_PORT})")
    return proc.pid


def stop():
    p = pid()
    if p:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass
        wait_for(lambda: not alive(p), 10, "apt-cacher-ng to stop")
    PID_FILE.unlink(missing_ok=True)


def transfers(since: int = 0) -> list[list[str]]:
    """apt-cacher-ng's transfer log (LOG_DIR/apt-cacher.log) from byte offset `since`, as
    [time, kind, bytes, client, path] rows: kind "I" = fetched from the mirror, "O" = delivered
    to a client.  A path delivered (O) with no I line for it was served from the cache."""
    try:
        with open(TRANSFER_LOG, "rb") as f:
            f.seek(since)
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.split("|") for line in data.splitlines() if line.count("|") >= 4]
