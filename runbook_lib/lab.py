"""The local lab: real hosts made of Linux namespaces on this machine, reached over real ssh.

    python -m runbook_lib.lab up       # idempotent: a healthy lab is left as it is
    python -m runbook_lib.lab status   # exit 0 when everything answers, 1 otherwise
    python -m runbook_lib.lab down     # [--purge: also forget the ssh keys]

Layout (all state in /var/lib/runbook-lab, whatever folder this runs from):

    control node   root namespaces, 198.18.0.1 on bridge rblab0; its own dockerd on
                   /var/run/docker.sock (data root /var/lib/runbook-lab/control/docker)
                   with `registry:2` and `busybox:latest` (images to push); it does NOT
                   resolve the lab's host names (its /etc/hosts is left alone): use addresses
    ceph1          198.18.0.2  netns rbl-ceph1: sshd + single-node Ceph pacific (cephx;
                   mon a, mgr x, memstore osd.0); `ceph -s` works there with no flags
    registry1      198.18.0.3  netns rbl-registry1: sshd + dockerd (/var/run/docker.sock
                   inside) holding a locally built `registry:2` image

Each host is `ip netns exec rbl-NAME unshare --uts --mount --propagation private`: its own
hostname, its own /etc/hosts (all lab hosts), and private tmpfs mounts on PRIVATE_DIRS; its
long-lived process is `sshd -D -e -f CFG` (root login with SSH_KEY only; host key pinned in
KNOWN_HOSTS under the address and the hostname).  `host_exec()` runs a command in a host's
namespaces with nsenter, without ssh.  Hosts share the PID namespace: `ps`/`pkill` in a host
see every process of the machine (use pidfiles).

`down` keeps /var/lib/runbook-lab/ssh (the client key and the hosts' keys, so KNOWN_HOSTS stays
valid across restarts); `down --purge` removes it too.  Everything else goes: processes,
namespaces, veths, the bridge, mounts, docker data, skopeo caches, lab entries in
/etc/docker/certs.d and in docker/skopeo auth files.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import _lab_ceph, _lab_image
from ._lab_proc import (CLEAN_ENV, LabError, alive, descendants, kill_all, mounts_under, processes, read_proc, run,
                        umount_all, wait_for)

__all__ = ["LAB_DIR", "RUN_DIR", "SSH_DIR", "SSH_KEY", "KNOWN_HOSTS", "HOSTS", "CONTROL_ADDR", "BRIDGE",
           "NETWORK", "PRIVATE_DIRS", "PACKAGES", "LabError", "up", "down", "status", "host_exec",
           "host_path", "host_pid", "add_host", "remove_host", "hosts", "ssh_argv", "lab_processes",
           "ensure_packages", "CONTROL_NAME", "REGISTRY_IMAGE", "DOCKER_SOCK", "main"]

# ------------------------------------------------------------------ contract

LAB_DIR = Path("/var/lib/runbook-lab")
RUN_DIR = Path("/run/runbook-lab")          # control dockerd's exec root and pidfile
SSH_DIR = LAB_DIR / "ssh"
SSH_KEY = SSH_DIR / "id_ed25519"
KNOWN_HOSTS = SSH_DIR / "known_hosts"
AUTHORIZED_KEYS = SSH_DIR / "authorized_keys"
HOSTKEY_DIR = SSH_DIR / "hostkeys"
HOSTS_DIR = LAB_DIR / "hosts"
ETC_HOSTS = LAB_DIR / "etc-hosts"
CONTROL_DIR = LAB_DIR / "control"
IMAGES_DIR = LAB_DIR / "images"
LOCK_FILE = Path("/run/lock/runbook-lab.lock")

BRIDGE = "rblab0"
NETWORK = ipaddress.ip_network("198.18.0.0/24")
CONTROL_ADDR = "198.18.0.1"
CONTROL_NAME = "control"
HOSTS = {"ceph1": "198.18.0.2", "registry1": "198.18.0.3"}
_ROLES = {"ceph1": {"ceph": True, "docker": False}, "registry1": {"ceph": False, "docker": True}}
NS_PREFIX = "rbl-"

DOCKER_SOCK = "/var/run/docker.sock"
DOCKERD_FLAGS = ["--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
                 "--storage-driver=vfs"]
REGISTRY_IMAGE = "registry:2"
CONTROL_IMAGES = [REGISTRY_IMAGE, "busybox:latest"]

PRIVATE_DIRS = ["/run", "/tmp", "/var/tmp", "/root", "/opt", "/srv", "/etc/ceph", "/etc/docker",
                "/etc/kubernetes", "/var/lib/ceph", "/var/log/ceph", "/var/lib/docker",
                "/var/lib/containers", "/var/lib/docker-registry"]

PACKAGES = ["ceph-mon", "ceph-osd", "ceph-mgr", "radosgw", "ceph-common", "docker-registry", "skopeo",
            "busybox-static", "apache2-utils", "golang-cfssl", "docker.io", "openssh-server",
            "openssh-client", "iproute2", "util-linux", "procps"]

_DAEMON_COMMS = {"sshd", "dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "runc",
                 "ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "docker-registry", "registry"}

_print_lock = threading.Lock()


def _log(msg: str):
    with _print_lock:
        try:
            print(f"[lab] {msg}", file=sys.stdout, flush=True)
        except (OSError, ValueError):  # closed/broken stdout must not break the lab
            pass


@contextlib.contextmanager
def _step(what: str):
    t = time.monotonic()
    try:
        yield
    except Exception:
        _log(f"{what:<40} FAILED after {time.monotonic() - t:.2f} s")
        raise
    _log(f"{what:<40} {time.monotonic() - t:6.2f} s")


_lock_depth = 0
_lock_mutex = threading.RLock()


@contextlib.contextmanager
def _locked():
    """One lab operation at a time on this machine (flock), re-entrant within this process."""
    global _lock_depth
    with _lock_mutex:
        if _lock_depth:
            _lock_depth += 1
            try:
                yield
            finally:
                _lock_depth -= 1
            return
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK_FILE, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            _lock_depth = 1
            try:
                yield
            finally:
                _lock_depth = 0
                fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------ hosts


def _ns(name: str) -> str:
    return NS_PREFIX + name


def _veth(name: str) -> str:
    v = NS_PREFIX + name
    return v if len(v) <= 15 else NS_PREFIX + hashlib.sha1(name.encode()).hexdigest()[:11]


def _host_dir(name: str) -> Path:
    return HOSTS_DIR / name


def _meta(name: str) -> dict | None:
    try:
        return json.loads((_host_dir(name) / "host.json").read_text())
    except (OSError, ValueError):
        return None


def hosts() -> dict[str, str]:
    """All hosts of the running lab (HOSTS plus those added with add_host): name -> address."""
    out = {}
    if HOSTS_DIR.is_dir():
        for d in sorted(HOSTS_DIR.iterdir()):
            m = _meta(d.name)
            if m:
                out[m["name"]] = m["addr"]
    return out


def host_pid(name: str) -> int:
    """The pid of a host's sshd, its long-lived process (the anchor of its namespaces)."""
    try:
        pid = int((_host_dir(name) / "pid").read_text())
    except (OSError, ValueError):
        raise LabError(f"lab host {name!r} is not running (python -m runbook_lib.lab up)") from None
    p = read_proc(pid)
    if p is None or p.comm != "sshd" or p.state in ("Z", "X"):
        raise LabError(f"lab host {name!r} is not running: its sshd (pid {pid}) is gone "
                       f"(python -m runbook_lib.lab up)")
    return pid


def _nsenter(name: str) -> list[str]:
    return ["nsenter", "-t", str(host_pid(name)), "-n", "-m", "-u", "--"]


def host_exec(name: str, argv: list[str], check: bool = True, input=None, timeout: float | None = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run argv inside lab host `name` (its net, mount and uts namespaces), like an ssh login
    would (clean environment, HOME=/root), without ssh.  Output is captured as text (bytes when
    `input` is bytes).  A non-zero exit raises LabError unless check=False."""
    return run(_nsenter(name) + list(argv), check=check, input=input, timeout=timeout,
               env={**CLEAN_ENV, **(env or {})}, what=f"on {name}")


def host_path(name: str, path: str) -> str:
    """`path` inside host `name`, as seen from the control node (through /proc/PID/root).

    Symlinks are resolved here, inside the host: the kernel would resolve an absolute symlink
    met under /proc/PID/root (e.g. /var/run -> /run) against the CONTROL node's root."""
    root = f"/proc/{host_pid(name)}/root"
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        cand = "/".join([root, *done, part])
        if os.path.islink(cand):
            hops += 1
            if hops > 40:
                raise LabError(f"too many symlinks in {path} on {name}")
            target = os.readlink(cand)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
        else:
            done.append(part)
    return "/".join([root, *done])


def ssh_argv(name_or_addr: str, *command: str) -> list[str]:
    """An OpenSSH command line that logs into a lab host as root with the lab key, checking its
    host key strictly against KNOWN_HOSTS."""
    addr = hosts().get(name_or_addr) or HOSTS.get(name_or_addr) or name_or_addr
    return ["ssh", "-F", "/dev/null", "-i", str(SSH_KEY), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={KNOWN_HOSTS}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            "-o", "LogLevel=ERROR", f"root@{addr}", *command]


def _sshd_config(name: str, addr: str) -> str:
    d = _host_dir(name)
    return f"""\
# lab host {name}: written by runbook_lib.lab
Port 22
ListenAddress {addr}
HostKey {HOSTKEY_DIR / name}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {AUTHORIZED_KEYS}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AcceptEnv LANG LC_*
MaxStartups 100:30:200
MaxSessions 64
"""


def _cgroup_script() -> str:
    """Shell lines re-creating this machine's cgroup mounts inside a host (ip netns exec hides them)."""
    lines = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mp = left.split()[4]
            fstype, _src, sopts = right.split()[:3]
            if mp == "/sys/fs/cgroup" and fstype == "cgroup2":
                return "mount -t cgroup2 cgroup2 /sys/fs/cgroup\n"
            if not mp.startswith("/sys/fs/cgroup/"):
                continue
            if fstype == "cgroup":
                opts = [o for o in sopts.split(",") if o not in ("rw", "ro")]
                if any(o.startswith("name=") for o in opts) and "none" not in opts:
                    opts.insert(0, "none")
                lines.append(f"mkdir -p {mp}; mount -t cgroup -o {','.join(opts)} cgroup {mp}")
            elif fstype == "cgroup2":
                lines.append(f"mkdir -p {mp}; mount -t cgroup2 cgroup2 {mp}")
    if not lines:
        raise LabError("no cgroup mounts under /sys/fs/cgroup on this machine: dockerd cannot run")
    return "mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup\n" + "\n".join(lines) + "\n"


def _host_script(name: str, docker: bool) -> str:
    mounts = "\n".join(
        f"mkdir -p {d}; mount -t tmpfs -o mode={'1777' if d in ('/tmp', '/var/tmp') else '755'} "
        f"{_ns(name)} {d}" for d in PRIVATE_DIRS)
    return f"""set -e
hostname {name}
{mounts}
chmod 700 /root
mount --bind {ETC_HOSTS} /etc/hosts
mkdir -p /run/sshd /run/ceph /run/lock /var/lib/ceph/tmp
{_cgroup_script() if docker else ''}
exec /usr/sbin/sshd -D -e -f {_host_dir(name) / 'sshd_config'}
"""


def _write_etc_hosts():
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{CONTROL_ADDR}\t{CONTROL_NAME}"]
    lines += [f"{a}\t{n}" for n, a in sorted(hosts().items(), key=lambda x: ipaddress.ip_address(x[1]))]
    data = "\n".join(lines) + "\n"
    # in place: every host bind-mounts this very inode over its /etc/hosts
    with open(ETC_HOSTS, "a+") as f:
        f.seek(0)
        if f.read() != data:
            f.seek(0)
            f.truncate()
            f.write(data)


def _write_known_hosts():
    lines = []
    for n, a in sorted(hosts().items(), key=lambda x: ipaddress.ip_address(x[1])):
        kt, key = (HOSTKEY_DIR / f"{n}.pub").read_text().split()[:2]
        lines += [f"{a} {kt} {key}", f"{n} {kt} {key}"]
    tmp = KNOWN_HOSTS.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, KNOWN_HOSTS)


def _ensure_keys(names):
    SSH_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(SSH_DIR, 0o700)
    HOSTKEY_DIR.mkdir(exist_ok=True)
    if not SSH_KEY.exists() or not SSH_KEY.with_suffix(".pub").exists():
        for p in (SSH_KEY, SSH_KEY.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "runbook-lab", "-f", SSH_KEY])
    pub = SSH_KEY.with_suffix(".pub").read_text()
    if not AUTHORIZED_KEYS.exists() or AUTHORIZED_KEYS.read_text() != pub:
        AUTHORIZED_KEYS.write_text(pub)
    for n in names:
        k = HOSTKEY_DIR / n
        if not k.exists() or not k.with_suffix(".pub").exists():
            for p in (k, k.with_suffix(".pub")):
                p.unlink(missing_ok=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{n}", "-f", k])


def _mac(addr: str, kind: int) -> str:
    """A fixed, locally administered MAC derived from an address: a host re-created at the same
    address keeps its MAC, so ARP caches on the bridge and in the other hosts stay right."""
    return ":".join(f"{b:02x}" for b in (0x02, kind, *ipaddress.ip_address(addr).packed))


def _bridge_up():
    for line in run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines():
        f = line.split()
        if len(f) > 3 and f[1] != BRIDGE and ipaddress.ip_interface(f[3]).network.overlaps(NETWORK):
            raise LabError(f"interface {f[1]} already holds {f[3]}, inside the lab network {NETWORK}: "
                           f"remove it first (ip link del {f[1]})")
    if not Path(f"/sys/class/net/{BRIDGE}").exists():
        # a fixed MAC: a bridge otherwise takes its lowest port's MAC, which changes as hosts come and go
        run(["ip", "link", "add", BRIDGE, "address", _mac(CONTROL_ADDR, 0), "type", "bridge"])
        run(["ip", "addr", "add", f"{CONTROL_ADDR}/{NETWORK.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


_children: dict[int, subprocess.Popen] = {}


def _spawn(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a long-lived process detached from us (own session; survives `lab up` exiting)."""
    with open(log, "ab") as lf:
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=lf,
                             stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                             env=env or CLEAN_ENV)
    _children[p.pid] = p
    return p


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _tcp_open(addr: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def _start_host(name: str, addr: str, docker: bool = False, ceph: bool = False, extra: bool = False):
    d = _host_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    (d / "sshd_config").write_text(_sshd_config(name, addr))
    (d / "host.json").write_text(json.dumps({"name": name, "addr": addr, "docker": docker, "ceph": ceph,
                                             "extra": extra, "netns": _ns(name), "veth": _veth(name)}))
    _ensure_keys([name])
    _write_known_hosts()
    _write_etc_hosts()
    ns, veth = _ns(name), _veth(name)
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", veth, "address", _mac(addr, 1), "type", "veth",
         "peer", "name", "eth0", "address", _mac(addr, 0), "netns", ns])
    run(["ip", "neigh", "flush", "to", addr, "dev", BRIDGE], check=False)
    run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{addr}/{NETWORK.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    log = d / "sshd.log"
    p = _spawn(["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", _host_script(name, docker)], log)
    (d / "pid").write_text(str(p.pid))

    def listening():
        if p.poll() is not None:
            raise LabError(f"host {name}: setup/sshd exited with {p.returncode}:\n{_tail(log)}")
        return _tcp_open(addr, 22)
    wait_for(listening, 15, f"sshd of {name} on {addr}:22", detail=lambda: _tail(log))
    if read_proc(p.pid).comm != "sshd":
        raise LabError(f"host {name}: pid {p.pid} is {read_proc(p.pid).comm}, not sshd")


def _docker_ping(sock: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(sock)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]
    except OSError:
        return False


def _start_host_dockerd(name: str):
    d = _host_dir(name)
    cfg = d / "daemon.json"
    cfg.write_text(json.dumps({"deprecated-key-path": "/etc/docker/key.json"}))
    log = d / "dockerd.log"
    p = _spawn(_nsenter(name) + ["dockerd", *DOCKERD_FLAGS, "--data-root", "/var/lib/docker",
                                 "--exec-root", "/var/run/docker", "--pidfile", "/var/run/docker.pid",
                                 "--config-file", cfg, "-H", f"unix://{DOCKER_SOCK}"], log)
    (d / "dockerd.pid").write_text(str(p.pid))
    sock = host_path(name, DOCKER_SOCK)

    def up_():
        if p.poll() is not None:
            raise LabError(f"dockerd on {name} exited with {p.returncode}:\n{_tail(log)}")
        return _docker_ping(sock)
    wait_for(up_, 30, f"dockerd on {name}", detail=lambda: _tail(log))


def restart_docker(name: str, timeout: float = 60) -> None:
    """A host's reboot as docker sees it: dockerd stopped the way a shutdown stops it (SIGTERM: it stops
    the containers), then started again as at boot (containers with a restart policy come back)."""
    pid_file = _host_dir(name) / "dockerd.pid"
    pid = int(pid_file.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)

    def gone():  # exited (a zombie until whoever started it reaps it counts as exited)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        return stat[stat.rindex(")") + 2] == "Z"
    wait_for(gone, timeout, f"dockerd on {name} to stop")
    _start_host_dockerd(name)


def _start_control_dockerd():
    if os.path.exists(DOCKER_SOCK):
        if _docker_ping(DOCKER_SOCK):
            raise LabError(f"another docker daemon already answers on {DOCKER_SOCK}; stop it first "
                           f"(the lab's control node runs its own dockerd there)")
        os.unlink(DOCKER_SOCK)
    CONTROL_DIR.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    cfg = CONTROL_DIR / "daemon.json"
    cfg.write_text(json.dumps({"deprecated-key-path": str(CONTROL_DIR / "key.json")}))
    log = CONTROL_DIR / "dockerd.log"
    # own mount namespace: whatever dockerd mounts (container shm, netns) dies with it
    p = _spawn(["unshare", "--mount", "--propagation", "private", "dockerd", *DOCKERD_FLAGS,
                "--data-root", CONTROL_DIR / "docker", "--exec-root", RUN_DIR / "docker",
                "--pidfile", RUN_DIR / "dockerd.pid", "--config-file", cfg, "-H", f"unix://{DOCKER_SOCK}"], log)
    (CONTROL_DIR / "pid").write_text(str(p.pid))

    def up_():
        if p.poll() is not None:
            raise LabError(f"control dockerd exited with {p.returncode}:\n{_tail(log)}")
        return _docker_ping(DOCKER_SOCK)
    wait_for(up_, 30, "control dockerd", detail=lambda: _tail(log))


def _image_tar(kind: str) -> Path:
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    p = IMAGES_DIR / f"{kind}.tar"
    if not p.exists():
        (_lab_image.build_registry_tar if kind == "registry" else _lab_image.build_busybox_tar)(str(p))
    return p


def _import(prefix: list[str], tar: Path, changes: list[str], tag: str, env=None):
    with open(tar, "rb") as f:
        run(_lab_image.import_argv(prefix + ["docker"], changes, tag), stdin=f, env=env or CLEAN_ENV,
            what=f"docker import {tag}")


def _import_registry(name: str | None):
    prefix = _nsenter(name) if name else []
    _import(prefix, _image_tar("registry"), _lab_image.REGISTRY_CHANGES, REGISTRY_IMAGE)
    if name is None:
        _import(prefix, _image_tar("busybox"), _lab_image.BUSYBOX_CHANGES, "busybox:latest")


def _ceph_hx(name):
    return lambda argv, **kw: host_exec(name, argv, **kw)


# ------------------------------------------------------------------ finding a lab (also a dead one)


def _host_anchor_pids(table) -> set[int]:
    """sshd processes of any lab host (their config lives under LAB_DIR/hosts)."""
    marker = str(HOSTS_DIR) + "/"
    return {p.pid for p in table.values()
            if p.comm == "sshd" and any(a.startswith(marker) for a in p.cmdline)}


def lab_processes(table=None) -> set[int]:
    """Every process that belongs to the lab: all processes in the hosts' network or mount
    namespaces (also of namespaces whose netns file was removed), the control dockerd and their
    descendants (containerd, shims, containers)."""
    table = table if table is not None else processes()
    me = read_proc(os.getpid())
    netns, mntns = set(), set()
    for f in glob.glob(f"/run/netns/{NS_PREFIX}*"):
        with contextlib.suppress(OSError):
            netns.add(os.stat(f).st_ino)
    for pid in _host_anchor_pids(table):
        netns.add(table[pid].netns)
        mntns.add(table[pid].mntns)
    netns.discard(me.netns)
    netns.discard(None)
    mntns.discard(me.mntns)
    mntns.discard(None)
    roots = {p.pid for p in table.values() if p.netns in netns or p.mntns in mntns}
    markers = (str(LAB_DIR) + "/", str(RUN_DIR) + "/")
    roots |= {p.pid for p in table.values()
              if p.comm in _DAEMON_COMMS and any(m in a for a in p.cmdline for m in markers)}
    with contextlib.suppress(OSError, ValueError):
        pid = int((CONTROL_DIR / "pid").read_text())
        if pid in table and table[pid].comm in ("dockerd", "unshare"):
            roots.add(pid)
    return descendants(roots, table)


# ------------------------------------------------------------------ teardown


def _links() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def _rm(path):
    p = Path(path)
    if p.is_symlink() or p.is_file() or p.is_socket():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            raise LabError(f"could not remove {p}")


def _is_lab_registry(key: str, names) -> bool:
    host = re.sub(r"^https?://", "", key).split("/")[0].split(":")[0]
    return host.startswith("198.18.") or host.startswith("198.19.") or host in names


def _clean_auth_file(path: Path, names):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    auths = data.get("auths")
    if isinstance(auths, dict):
        keep = {k: v for k, v in auths.items() if not _is_lab_registry(k, names)}
        if keep != auths:
            data["auths"] = keep
            path.write_text(json.dumps(data, indent="\t") + "\n")


def _teardown(keep_ssh: bool = True) -> dict:
    names = set(HOSTS) | set(hosts()) | {CONTROL_NAME}
    table = processes()
    pids = lab_processes(table)
    n = kill_all(pids, what="lab processes")
    for p in list(_children.values()):  # reap our own
        with contextlib.suppress(Exception):
            p.poll()
    _children.clear()
    links = [l for l in _links() if l.startswith(NS_PREFIX)]
    for l in links:
        run(["ip", "link", "del", l], check=False)
    nss = [os.path.basename(f) for f in glob.glob(f"/run/netns/{NS_PREFIX}*")]
    for ns in nss:
        run(["ip", "netns", "del", ns])
    if BRIDGE in _links():
        run(["ip", "link", "del", BRIDGE])
    if os.path.isdir("/run/netns") and not os.listdir("/run/netns") and mounts_under(["/run/netns"]):
        run(["umount", "/run/netns"], check=False)  # iproute2's own bind mount, when no netns is left
    mounts = umount_all([str(LAB_DIR), str(RUN_DIR)])
    # state
    if LAB_DIR.exists():
        for child in LAB_DIR.iterdir():
            if keep_ssh and child == SSH_DIR:
                continue
            _rm(child)
        if not keep_ssh:
            _rm(LAB_DIR)
    _rm(RUN_DIR)
    if os.path.exists(DOCKER_SOCK) and not _docker_ping(DOCKER_SOCK):
        os.unlink(DOCKER_SOCK)
    _rm("/run/docker/plugins")
    with contextlib.suppress(OSError):
        os.rmdir("/run/docker")
    _rm("/var/lib/containers/cache")
    for pat in ("/var/tmp/docker-tarfile-blob*", "/var/tmp/container_images_*", "/var/tmp/storage*",
                "/var/tmp/docker-daemon-*", "/var/tmp/skopeo*"):
        for f in glob.glob(pat):
            _rm(f)
    for d in ("/var/lib/containers", "/var/lib/docker"):
        with contextlib.suppress(OSError):
            os.rmdir(d)  # only when empty (the hosts' mount points)
    for d in glob.glob("/etc/docker/certs.d/*"):
        if _is_lab_registry(os.path.basename(d), names):
            _rm(d)
    _clean_auth_file(Path("/root/.docker/config.json"), names)
    _clean_auth_file(Path(f"/run/containers/{os.getuid()}/auth.json"), names)
    left = [l for l in _links() if l.startswith(NS_PREFIX) or l == BRIDGE]
    if left:
        raise LabError(f"links still present after teardown: {left}")
    return {"processes": n, "links": len(links), "netns": len(nss), "mounts": len(mounts)}


# ------------------------------------------------------------------ packages


def _missing_packages() -> list[str]:
    cp = run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *PACKAGES], check=False)
    ok = {line.split()[0] for line in cp.stdout.splitlines() if len(line.split()) > 1
          and line.split()[1] == "ii"}
    return [p for p in PACKAGES if p not in ok]


def ensure_packages():
    missing = _missing_packages()
    if not missing:
        return []
    _log(f"installing {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], env=env, timeout=600, what="apt-get update")
    run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env, timeout=1800,
        what="apt-get install")
    return missing


# ------------------------------------------------------------------ status


def _check_host(name: str, meta: dict) -> dict:
    r = {"address": meta["addr"], "running": False, "ssh": False, "hostname": None}
    try:
        host_pid(name)
        r["running"] = True
    except LabError as e:
        r["error"] = str(e)
    try:
        if not r["running"]:  # no sshd: with the bridge gone, ssh would wait for its ConnectTimeout
            raise LabError("host not running")
        cp = run(ssh_argv(meta["addr"], "hostname"), check=False, timeout=15)
        r["hostname"] = cp.stdout.strip() or None
        r["ssh"] = cp.returncode == 0 and r["hostname"] == name
        if cp.returncode != 0:
            r["ssh_error"] = cp.stderr.strip()[-300:]
    except LabError as e:
        r["ssh_error"] = str(e)
    ok = r["running"] and r["ssh"]
    if meta.get("ceph"):
        r["ceph_health"] = None
        if r["running"]:
            try:
                cp = host_exec(name, ["ceph", "--connect-timeout", "5", "health"], check=False, timeout=20)
                r["ceph_health"] = (cp.stdout.strip() or cp.stderr.strip()[-300:]) or None
            except LabError as e:
                r["ceph_health"] = str(e)[-300:]
        ok = ok and r["ceph_health"] == "HEALTH_OK"
    if meta.get("docker"):
        r["docker"] = r["registry_image"] = False
        if r["running"]:
            try:
                cp = host_exec(name, ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                               check=False, timeout=20)
                r["docker"] = cp.returncode == 0
                r["registry_image"] = REGISTRY_IMAGE in cp.stdout.split()
            except LabError as e:
                r["docker_error"] = str(e)[-300:]
        ok = ok and r["docker"] and r["registry_image"]
    r["ok"] = bool(ok)
    return r


def _check_control() -> dict:
    r = {"address": CONTROL_ADDR, "bridge": BRIDGE in _links(), "docker": False}
    try:
        pid = int((CONTROL_DIR / "pid").read_text())
        r["docker"] = alive(pid) and _docker_ping(DOCKER_SOCK)
    except (OSError, ValueError):
        pass
    r["ok"] = r["bridge"] and r["docker"]
    return r


def status() -> dict:
    """{"ok": bool, "hosts": {name: {...}}, "control": {...}, "processes": n, "rss_mb": float}."""
    metas = {n: {"name": n, "addr": a, **_ROLES[n]} for n, a in HOSTS.items()}
    for n in hosts():
        metas[n] = _meta(n) or metas.get(n)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(metas) + 1) as ex:
        futs = {n: ex.submit(_check_host, n, m) for n, m in metas.items()}
        ctl = ex.submit(_check_control)
        res_hosts = {n: f.result() for n, f in futs.items()}
        control = ctl.result()
    table = processes()
    pids = lab_processes(table)
    return {"ok": all(h["ok"] for h in res_hosts.values()) and control["ok"],
            "hosts": res_hosts, "control": control, "processes": len(pids),
            "rss_mb": round(sum(table[p].rss for p in pids if p in table) / 2**20, 1)}


def _problems(st: dict) -> list[str]:
    out = []
    for n, h in st["hosts"].items():
        if not h["running"]:
            out.append(f"{n} not running")
            continue
        if not h["ssh"]:
            out.append(f"{n} ssh: {h.get('ssh_error') or h.get('hostname')}")
        if "ceph_health" in h and h["ceph_health"] != "HEALTH_OK":
            out.append(f"{n} ceph: {h['ceph_health']}")
        if "docker" in h and not (h["docker"] and h["registry_image"]):
            out.append(f"{n} docker: {'no ' + REGISTRY_IMAGE if h['docker'] else 'not answering'}")
    c = st["control"]
    if not c["ok"]:
        out.append("control: " + ", ".join(k for k in ("bridge", "docker") if not c[k]) + " down")
    return out


def _settled_status(grace: float = 10.0) -> dict:
    """status(), but when everything runs and only Ceph is not HEALTH_OK (a pool being created by a
    notebook peers for a second), give Ceph `grace` seconds to settle before calling it unhealthy."""
    st = status()
    only_ceph = not st["ok"] and all(p.split(" ", 2)[1] == "ceph:" for p in _problems(st))
    if only_ceph:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(1)
            st = status()
            if st["ok"]:
                break
    return st


def _looks_up() -> bool:
    return all((_host_dir(n) / "pid").exists() for n in HOSTS) and (CONTROL_DIR / "pid").exists()


# ------------------------------------------------------------------ up / down


def up() -> dict:
    """Bring the lab up (idempotent).  Returns status()."""
    t0 = time.monotonic()
    with _locked():
        with _step("packages"):
            ensure_packages()
        if _looks_up():
            with _step("check running lab"):
                st = _settled_status()
            if st["ok"]:
                _log(f"lab already up and healthy; nothing changed ({time.monotonic() - t0:.2f} s)")
                return st
            _log("lab is not healthy (" + "; ".join(_problems(st)) + "): rebuilding it")
        with _step("clear earlier lab"):
            _teardown(keep_ssh=True)
        with _step("ssh keys"):
            _ensure_keys(list(HOSTS))
            LAB_DIR.mkdir(parents=True, exist_ok=True)
        with _step(f"bridge {BRIDGE} {CONTROL_ADDR}/{NETWORK.prefixlen}"):
            _bridge_up()
        for name, addr in HOSTS.items():
            with _step(f"host {name} {addr} (netns, sshd)"):
                _start_host(name, addr, **_ROLES[name])

        ceph_hosts = [n for n in HOSTS if _ROLES[n]["ceph"]]
        docker_hosts = [n for n in HOSTS if _ROLES[n]["docker"]]

        def ceph_start(n):
            with _step(f"ceph on {n}: mon, mgr, osd"):
                _lab_ceph.start(_ceph_hx(n), lambda p: host_path(n, p), HOSTS[n], str(NETWORK), log=_log)

        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
            ceph_futs = [ex.submit(ceph_start, n) for n in ceph_hosts]
            with _step("dockerd on control"):
                _start_control_dockerd()
            for n in docker_hosts:
                with _step(f"dockerd on {n}"):
                    _start_host_dockerd(n)
            with _step("build images"):
                _image_tar("registry")
                _image_tar("busybox")
            for n in docker_hosts:
                with _step(f"import {REGISTRY_IMAGE} on {n}"):
                    _import_registry(n)
            with _step(f"import {', '.join(CONTROL_IMAGES)} on control"):
                _import_registry(None)
            for f in ceph_futs:
                f.result()
        for n in ceph_hosts:
            with _step(f"ceph HEALTH_OK on {n}"):
                _lab_ceph.wait_healthy(_ceph_hx(n))
        with _step("final status"):
            st = status()
        if not st["ok"]:
            raise LabError("lab came up but status is not all green:\n" + _format_status(st))
        _log(f"lab up in {time.monotonic() - t0:.2f} s ({st['processes']} processes, {st['rss_mb']} MB RSS)")
        return st


def down(purge: bool = False) -> dict:
    """Stop and remove the lab (safe to run any number of times).  purge=True also removes the
    ssh keys in SSH_DIR (then KNOWN_HOSTS changes on the next up)."""
    t0 = time.monotonic()
    with _locked():
        r = _teardown(keep_ssh=not purge)
    _log(f"lab down in {time.monotonic() - t0:.2f} s: killed {r['processes']} processes, removed "
         f"{r['netns']} namespaces, {r['links']} veths, {r['mounts']} mounts"
         + ("; ssh keys removed" if purge else f"; kept {SSH_DIR}"))
    return r


def add_host(name: str, addr: str, docker: bool = False) -> str:
    """Add a bare host to the running lab (its own netns, hostname, private dirs and sshd; no Ceph
    keyring), with its own dockerd and registry:2 image when docker=True.  Idempotent for the
    same name and address.  Returns the address.  Hosts added here go away with remove_host()
    or down()."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name) or name == CONTROL_NAME:
        raise LabError(f"bad lab host name {name!r} (lowercase letters, digits, '-')")
    ip = ipaddress.ip_address(addr)
    if ip not in NETWORK or ip in (NETWORK.network_address, NETWORK.broadcast_address,
                                   ipaddress.ip_address(CONTROL_ADDR)):
        raise LabError(f"address {addr} is not a free host address in {NETWORK}")
    with _locked():
        if BRIDGE not in _links():
            raise LabError("the lab is not up (python -m runbook_lib.lab up)")
        current = hosts()
        if name in current:
            try:
                host_pid(name)
            except LabError:  # a dead leftover of this host: replace it
                remove_host(name)
                current = hosts()
            else:
                if current[name] == addr and bool(_meta(name).get("docker")) == bool(docker):
                    return addr
                raise LabError(f"lab host {name} already exists ({current[name]}); remove_host() it first")
        if addr in current.values():
            raise LabError(f"address {addr} is already used by {[n for n, a in current.items() if a == addr][0]}")
        t0 = time.monotonic()
        try:
            _start_host(name, addr, docker=docker, extra=True)
            _write_etc_hosts()
            if docker:
                _start_host_dockerd(name)
                _image_tar("registry")
                _import_registry(name)
        except Exception:
            with contextlib.suppress(Exception):
                remove_host(name)
            raise
        _log(f"host {name} {addr} added in {time.monotonic() - t0:.2f} s")
        return addr


def remove_host(name: str):
    """Stop and remove a host (any lab host; the base ones come back with the next `up`)."""
    with _locked():
        table = processes()
        pids: set[int] = set()
        nsfile = f"/run/netns/{_ns(name)}"
        inos = set()
        with contextlib.suppress(OSError):
            inos.add(os.stat(nsfile).st_ino)
        mnt = set()
        with contextlib.suppress(OSError, ValueError):
            pid = int((_host_dir(name) / "pid").read_text())
            if pid in table and table[pid].comm == "sshd":
                inos.add(table[pid].netns)
                mnt.add(table[pid].mntns)
        me = read_proc(os.getpid())
        inos -= {me.netns, None}   # None: a zombie's namespaces cannot be read; never match on that
        mnt -= {me.mntns, None}
        pids = {p.pid for p in table.values() if p.netns in inos or p.mntns in mnt}
        kill_all(descendants(pids, table), what=f"processes of {name}")
        if _veth(name) in _links():
            run(["ip", "link", "del", _veth(name)])
        if os.path.exists(nsfile):
            run(["ip", "netns", "del", _ns(name)])
        _rm(_host_dir(name))
        if name not in HOSTS:
            for p in (HOSTKEY_DIR / name, HOSTKEY_DIR / f"{name}.pub"):
                p.unlink(missing_ok=True)
        if HOSTKEY_DIR.exists():
            _write_known_hosts()
        if ETC_HOSTS.exists():
            _write_etc_hosts()


# ------------------------------------------------------------------ CLI


def _format_status(st: dict) -> str:
    def yn(v):
        return "ok" if v else "NO"
    lines = []
    for n, h in st["hosts"].items():
        parts = [f"{n:<12} {h['address']:<12} ssh {yn(h['ssh'])}"]
        if "ceph_health" in h:
            parts.append(f"ceph {h['ceph_health']}")
        if "docker" in h:
            parts.append(f"docker {yn(h['docker'])}  {REGISTRY_IMAGE} {yn(h['registry_image'])}")
        if not h["running"]:
            parts.append("(not running)")
        elif h.get("ssh_error"):
            parts.append(f"({h['ssh_error']})")
        lines.append("  ".join(parts))
    c = st["control"]
    lines.append(f"{CONTROL_NAME:<12} {c['address']:<12} bridge {yn(c['bridge'])}  docker {yn(c['docker'])}")
    lines.append(f"{st['processes']} processes, {st['rss_mb']} MB RSS")
    lines.append("ALL OK" if st["ok"] else "NOT OK")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runbook_lib.lab", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="bring the lab up (no-op when it is up and healthy)")
    d = sub.add_parser("down", help="stop the lab and remove its state")
    d.add_argument("--purge", action="store_true", help=f"also remove the ssh keys in {SSH_DIR}")
    s = sub.add_parser("status", help="check every host; exit 1 unless all is well")
    s.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the lab needs root", file=sys.stderr)
        return 2
    try:
        if a.cmd == "up":
            st = up()
            print(_format_status(st))
            return 0
        if a.cmd == "down":
            down(purge=a.purge)
            return 0
        st = status()
        print(json.dumps(st, indent=2) if a.json else _format_status(st))
        return 0 if st["ok"] else 1
    except LabError as e:
        print(f"lab {a.cmd} failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
