"""The local lab: real Debian 12 machines on this one, reached over real ssh.

    python -m runbook_lib.lab up       # idempotent: a healthy lab is left as it is
    python -m runbook_lib.lab status   # exit 0 when everything answers, 1 otherwise
    python -m runbook_lib.lab reboot ceph1
    python -m runbook_lib.lab down     # [--purge: also forget the ssh keys, images, apt cache]

Layout (all state in /var/lib/runbook-lab, whatever folder this runs from):

    control node   root namespaces, 198.18.0.1 on bridge rblab0; its own dockerd on
                   /var/run/docker.sock (data root /var/lib/runbook-lab/control/docker)
                   with `registry:2` and `busybox:latest` (images to push); skopeo; the apt
                   proxy (apt-cacher-ng) on 198.18.0.1:3142.  It does NOT resolve the lab's
                   host names (its /etc/hosts is left alone): use addresses
    ceph1          198.18.0.2  image "ceph": single-node Ceph pacific under systemd (cephx;
                   ceph-mon@a, ceph-mgr@x, ceph-osd@0 on memstore); radosgw NOT installed
    registry1      198.18.0.3  image "docker": docker.service (docker.io 20.10, vfs) holding
                   a locally built `registry:2` image

Every host is a Debian 12 system of its own (rootfs.py: mmdebstrap image + overlay per host;
hosts.py: systemd as PID 1 in its own pid/mount/uts/ipc/net/cgroup namespaces).  Log in as
`k8s` (SSH_USER) with SSH_KEY; root cannot log in; `sudo -n` works for k8s (unless the host was
added with sudo="password").  apt works in every host, through the proxy.  host_exec() runs a
command as root inside a host without ssh.  add_host(..., systemd=False) makes a host of the
old kind (legacy.py: namespaces on the control node's file system, sshd as root, no systemd).

`down` keeps /var/lib/runbook-lab/ssh (the client key and the hosts' keys, so KNOWN_HOSTS stays
valid across restarts), the images (rootfs/) and the apt cache (apt-cache/); `down --purge`
removes them too.  Everything else goes: processes, namespaces, veths, the bridge, cgroups,
hosts' disks, docker data, skopeo caches, lab entries in /etc/docker/certs.d and in
docker/skopeo auth files.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import glob
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from . import ceph as _ceph
from . import hosts as _hosts
from . import images as _images
from . import legacy as _legacy
from . import proxy as _proxy
from . import rootfs as _rootfs
from .hosts import host_exec, host_path, host_pid, hosts, ssh_argv
from .proc import (APT_CACHE_DIR, BRIDGE, CLEAN_ENV, CONTROL_ADDR, CONTROL_DIR, CONTROL_NAME, ETC_HOSTS,
                   HOSTKEY_DIR, IMAGES_DIR, KNOWN_HOSTS, LAB_DIR, LOCK_FILE, NETWORK, NS_PREFIX,
                   ROOTFS_DIR, RUN_DIR, SSH_DIR, SSH_KEY, SSH_USER, LabError, alive, descendants,
                   kill_all, log as _log, mounts_under, processes, read_proc, run, step as _step, umount_all,
                   wait_for)

__all__ = ["LAB_DIR", "RUN_DIR", "SSH_DIR", "SSH_KEY", "KNOWN_HOSTS", "HOSTS", "CONTROL_ADDR", "BRIDGE",
           "NETWORK", "PACKAGES", "LabError", "up", "down", "status", "host_exec", "host_path", "host_pid",
           "add_host", "add_ceph_host", "remove_host", "reboot", "hosts", "ssh_argv", "lab_processes",
           "ensure_packages", "CONTROL_NAME", "REGISTRY_IMAGE", "DOCKER_SOCK", "SSH_USER", "restart_docker",
           "main"]

HOSTS = {"ceph1": "198.18.0.2", "registry1": "198.18.0.3"}
ROLES = {"ceph1": "ceph", "registry1": "docker"}

DOCKER_SOCK = "/var/run/docker.sock"
DOCKERD_FLAGS = ["--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
                 "--storage-driver=vfs"]
REGISTRY_IMAGE = "registry:2"
CONTROL_IMAGES = [REGISTRY_IMAGE, "busybox:latest"]

# the control node's packages (the hosts' come from their images)
PACKAGES = ["ceph-mon", "ceph-osd", "ceph-mgr", "radosgw", "ceph-common", "docker-registry", "skopeo",
            "busybox-static", "apache2-utils", "golang-cfssl", "docker.io", "openssh-server",
            "openssh-client", "iproute2", "util-linux", "procps", "mmdebstrap", "apt-cacher-ng", "sudo"]

_DAEMON_COMMS = {"sshd", "dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "runc",
                 "ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "docker-registry", "registry",
                 "apt-cacher-ng", "mmdebstrap", "systemd", "unshare", "nsenter"}

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


def _meta(name: str) -> dict | None:
    return _hosts.meta(name)


def _is_legacy(name: str) -> bool:
    m = _meta(name)
    return m is not None and not m.get("systemd", True)


# ------------------------------------------------------------------ docker (control node and hosts)


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
    logf = CONTROL_DIR / "dockerd.log"
    # own mount namespace: whatever dockerd mounts (container shm, netns) dies with it
    p = _hosts.spawn(["unshare", "--mount", "--propagation", "private", "dockerd", *DOCKERD_FLAGS,
                "--data-root", CONTROL_DIR / "docker", "--exec-root", RUN_DIR / "docker",
                "--pidfile", RUN_DIR / "dockerd.pid", "--config-file", cfg, "-H", f"unix://{DOCKER_SOCK}"], logf)
    (CONTROL_DIR / "pid").write_text(str(p.pid))

    def up_():
        if p.poll() is not None:
            raise LabError(f"control dockerd exited with {p.returncode}:\n{_hosts.tail(logf)}")
        return _docker_ping(DOCKER_SOCK)
    wait_for(up_, 30, "control dockerd", detail=lambda: _hosts.tail(logf))


_tar_lock = threading.Lock()


def _image_tar(kind: str) -> Path:
    with _tar_lock:
        IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        p = IMAGES_DIR / f"{kind}.tar"
        if not p.exists():
            (_images.build_registry_tar if kind == "registry" else _images.build_busybox_tar)(str(p))
        return p


def _import(prefix: list[str], tar: Path, changes: list[str], tag: str, engine: str = "docker"):
    with open(tar, "rb") as f:
        run(_images.import_argv(prefix + [engine], changes, tag), stdin=f, env=CLEAN_ENV,
            what=f"{engine} import {tag}")


def _import_registry(name: str | None, engine: str = "docker"):
    prefix = _hosts.nsenter_argv(name) if name else []
    # podman names a short tag localhost/registry:2; the full name is what `registry:2` resolves to
    _import(prefix, _image_tar("registry"), _images.REGISTRY_CHANGES,
            REGISTRY_IMAGE if engine == "docker" else f"docker.io/library/{REGISTRY_IMAGE}", engine)
    if name is None:
        _import(prefix, _image_tar("busybox"), _images.BUSYBOX_CHANGES, "busybox:latest")


def _wait_host_docker(name: str, timeout: float = 30):
    wait_for(lambda: _docker_ping(host_path(name, DOCKER_SOCK)), timeout, f"docker.service on {name}",
             detail=lambda: host_exec(name, ["systemctl", "status", "--no-pager", "docker.service"],
                                      check=False).stdout[-1500:])


def restart_docker(name: str, timeout: float = 60) -> None:
    """A host's docker as after a reboot: docker.service stopped (dockerd stops the containers) and
    started again (containers with a restart policy come back).  Legacy hosts: dockerd itself."""
    if _is_legacy(name):
        return _legacy.restart_docker(name, timeout=timeout)
    host_exec(name, ["systemctl", "stop", "docker.service"], timeout=timeout)
    host_exec(name, ["systemctl", "start", "docker.service"], timeout=timeout)
    _wait_host_docker(name, timeout)


def _ceph_hx(name):
    return lambda argv, **kw: host_exec(name, argv, **kw)


# ------------------------------------------------------------------ hosts


def _write_etc_hosts_everywhere():
    """Every running host's /etc/hosts lists all lab hosts (and the legacy hosts' shared file)."""
    if ETC_HOSTS.exists() or any(_is_legacy(n) for n in hosts()):
        _legacy.write_etc_hosts()
    for n in hosts():
        if _is_legacy(n) or not _hosts.running(n):
            continue
        text = _hosts.etc_hosts_text(n)
        with contextlib.suppress(OSError, LabError):
            p = host_path(n, "/etc/hosts")
            if Path(p).read_text() != text:
                with open(p, "w") as f:
                    f.write(text)


def _create_host(name: str, addr: str, role: str, sudo: str = "nopasswd", extra: bool = False,
                 systemd: bool = True) -> dict:
    """Make and boot one host (its network first).  Returns timings."""
    times = {}
    _hosts.ensure_keys([name])
    m = {"name": name, "addr": addr, "role": role, "systemd": systemd, "sudo": sudo, "extra": extra,
         "ceph": False, "docker": role == "docker", "netns": _hosts.ns_name(name), "veth": _hosts.veth_name(name)}
    if not systemd:
        _hosts.write_meta(name, m)
        _hosts.write_known_hosts()
        _legacy.start_host(name, addr, docker=(role == "docker"))
        return times
    t = time.monotonic()
    m["image"] = str(_rootfs.ensure_image(role))
    times["image"] = time.monotonic() - t
    _hosts.write_meta(name, m)
    _hosts.write_known_hosts()
    _hosts.net_up(name, addr)            # before anything talks to addr
    t = time.monotonic()
    _hosts.boot(name)
    times.update(_hosts.wait_ready(name, sudo_check=(sudo == "nopasswd")))
    if sudo == "password":
        pw = secrets.token_urlsafe(12)
        pf = _hosts.host_dir(name) / "sudo-password"
        pf.write_text(pw + "\n")
        os.chmod(pf, 0o600)
        host_exec(name, ["chpasswd"], input=f"{SSH_USER}:{pw}\n")
    times["boot"] = time.monotonic() - t
    return times


def add_host(name: str, addr: str, docker: bool = False, *, systemd: bool = True, sudo: str = "nopasswd",
             role: str | None = None) -> str:
    """Add a host to the running lab and return its address.  Idempotent for the same arguments.

    systemd=True (default): a Debian 12 machine of its own (image "base", or "docker" when
    docker=True: docker.service with the registry:2 image; role="ceph" for the Ceph packages;
    role="podman": podman with the registry:2 image and no docker),
    user k8s with the lab key; sudo="nopasswd" (default) or "password" (k8s's sudo then asks
    for a password: `sudo -n true` fails; the password is in LAB_DIR/hosts/NAME/sudo-password).
    systemd=False: a host of the old kind (legacy.py: shared file system, sshd as root, no systemd).
    Hosts added here go away with remove_host() or down()."""
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name) or name == CONTROL_NAME:
        raise LabError(f"bad lab host name {name!r} (lowercase letters, digits, '-')")
    ip = ipaddress.ip_address(addr)
    if ip not in NETWORK or ip in (NETWORK.network_address, NETWORK.broadcast_address,
                                   ipaddress.ip_address(CONTROL_ADDR)):
        raise LabError(f"address {addr} is not a free host address in {NETWORK}")
    role = role or ("docker" if docker else "base")
    if role not in _rootfs.ROLE_PACKAGES:
        raise LabError(f"unknown role {role!r}")
    if not systemd and role == "ceph":
        raise LabError("a legacy host (systemd=False) has no Ceph role: use ceph.start() on it")
    _hosts.sudoers(sudo)   # validates
    with _locked():
        if BRIDGE not in _hosts.links() or not _proxy.running():
            raise LabError("the lab is not up (python -m runbook_lib.lab up)")
        current = hosts()
        if name in current:
            m = _meta(name)
            if not _hosts.running(name):   # a dead leftover of this host: replace it
                remove_host(name)
                current = hosts()
            elif (current[name] == addr and m.get("role") == role and bool(m.get("systemd", True)) == systemd
                  and m.get("sudo", "nopasswd") == sudo):
                return addr
            else:
                raise LabError(f"lab host {name} already exists ({current[name]}); remove_host() it first")
        if addr in current.values():
            raise LabError(f"address {addr} is already used by {[n for n, a in current.items() if a == addr][0]}")
        t0 = time.monotonic()
        try:
            _create_host(name, addr, role, sudo=sudo, extra=True, systemd=systemd)
            _write_etc_hosts_everywhere()
            if role == "docker":
                _wait_host_docker(name)
                _import_registry(name)
            elif role == "podman":
                _import_registry(name, engine="podman")
        except Exception:
            with contextlib.suppress(Exception):
                remove_host(name)
            raise
        _log(f"host {name} {addr} ({role}{'' if systemd else ', legacy'}) added in {time.monotonic() - t0:.2f} s")
        return addr


def add_ceph_host(name: str, addr: str, conf_overrides: dict | None = None) -> str:
    """Add a host with a second single-node Ceph cluster (same settings as ceph1's, with
    `conf_overrides` replacing or adding ceph.conf options, e.g. {"osd pool default pg num": 128}),
    HEALTH_OK when this returns.  Idempotent for the same arguments."""
    overrides = {str(k): str(v) for k, v in (conf_overrides or {}).items()}
    with _locked():
        m = _meta(name)
        if m and m.get("ceph") and m.get("conf_overrides") == overrides and _hosts.running(name) \
                and m.get("addr") == addr:
            return addr
        if m:
            remove_host(name)
        add_host(name, addr, role="ceph")
        t = time.monotonic()
        try:
            _ceph.bootstrap(_ceph_hx(name), lambda p: host_path(name, p), addr, str(NETWORK),
                            log=lambda msg: None, conf_overrides=overrides)
            _ceph.wait_healthy(_ceph_hx(name))
            m = _meta(name)
            m.update(ceph=True, conf_overrides=overrides)
            _hosts.write_meta(name, m)
        except Exception:
            with contextlib.suppress(Exception):
                remove_host(name)
            raise
        _log(f"ceph on {name} HEALTH_OK in {time.monotonic() - t:.2f} s")
        return addr


def remove_host(name: str):
    """Stop and remove a host (any lab host; the base ones come back with the next `up`)."""
    with _locked():
        m = _meta(name)
        if m is None or m.get("systemd", True):
            with contextlib.suppress(LabError):
                _hosts.kill(name)
        table = processes()
        inos, mnt = set(), set()
        with contextlib.suppress(OSError):
            inos.add(os.stat(f"/run/netns/{_hosts.ns_name(name)}").st_ino)
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((_hosts.host_dir(name) / "pid").read_text().split()[0])
            if pid in table and table[pid].comm == "sshd":
                inos.add(table[pid].netns)
                mnt.add(table[pid].mntns)
        me = read_proc(os.getpid())
        inos -= {me.netns, None}   # None: a zombie's namespaces cannot be read; never match on that
        mnt -= {me.mntns, None}
        pids = {p.pid for p in table.values() if p.netns in inos or p.mntns in mnt}
        pids |= _hosts.cgroup_pids(name)
        kill_all(descendants(pids, table), what=f"processes of {name}")
        _hosts.net_down(name)
        _hosts.remove_cgroups(name)
        _rm(_hosts.host_dir(name))
        if name not in HOSTS:
            for p in (HOSTKEY_DIR / name, HOSTKEY_DIR / f"{name}.pub"):
                p.unlink(missing_ok=True)
        if HOSTKEY_DIR.exists():
            _hosts.write_known_hosts()
        _write_etc_hosts_everywhere()


def reboot(name: str, timeout: float = 120) -> dict:
    """Reboot a host: systemd's poweroff (SIGRTMIN+4), wait until it is gone, boot the SAME overlay
    again, wait for systemd `running` and ssh.  Units enabled in the host come back by
    themselves (Ceph: wait for its health yourself).  Returns timings in seconds."""
    if _is_legacy(name):
        raise LabError(f"{name} is a legacy host (no systemd): it cannot reboot")
    with _locked():
        m = _meta(name)
        if m is None:
            raise LabError(f"no lab host {name!r}")
        t0 = time.monotonic()
        clean = _hosts.poweroff(name, timeout=min(30.0, timeout))
        t_off = time.monotonic() - t0
        _hosts.remove_cgroups(name, keep_top=True)
        _hosts.boot(name)
        r = _hosts.wait_ready(name, timeout=timeout, sudo_check=(m.get("sudo", "nopasswd") == "nopasswd"))
        out = {"poweroff": round(t_off, 2), "clean_poweroff": clean,
               "systemd": round(t_off + r["systemd"], 2), "ssh": round(t_off + r["ssh"], 2)}
        _log(f"host {name} rebooted: off {t_off:.2f} s, systemd running {out['systemd']:.2f} s, "
             f"ssh {out['ssh']:.2f} s")
        return out


# ------------------------------------------------------------------ finding a lab (also a dead one)


def lab_processes(table=None) -> set[int]:
    """Every process that belongs to the lab: the hosts' systemd and everything in their cgroups,
    pid or network namespaces (also of namespaces whose netns file was removed), legacy hosts'
    sshd and their mount namespaces, the control dockerd, the apt proxy, and their descendants."""
    table = table if table is not None else processes()
    me = read_proc(os.getpid())
    netns, mntns, pidns = set(), set(), set()
    for f in glob.glob(f"/run/netns/{NS_PREFIX}*"):
        with contextlib.suppress(OSError):
            netns.add(os.stat(f).st_ino)
    for pid in _legacy.anchor_pids(table):
        netns.add(table[pid].netns)
        mntns.add(table[pid].mntns)
    in_cgroups = {p for p in _hosts.cgroup_pids() if p in table}
    for pid in in_cgroups:
        pidns.add(table[pid].pidns)
        netns.add(table[pid].netns)
    for ns, mine in ((netns, me.netns), (mntns, me.mntns), (pidns, me.pidns)):
        ns.discard(mine)
        ns.discard(None)
    roots = {p.pid for p in table.values() if p.netns in netns or p.mntns in mntns or p.pidns in pidns}
    roots |= in_cgroups
    markers = (str(LAB_DIR) + "/", str(RUN_DIR) + "/")
    roots |= {p.pid for p in table.values()
              if p.comm in _DAEMON_COMMS and any(m in a for a in p.cmdline for m in markers)}
    with contextlib.suppress(OSError, ValueError):
        pid = int((CONTROL_DIR / "pid").read_text())
        if pid in table and table[pid].comm in ("dockerd", "unshare"):
            roots.add(pid)
    roots.discard(os.getpid())
    return descendants(roots, table) - {os.getpid()}


# ------------------------------------------------------------------ teardown


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


KEEP_ON_DOWN = {SSH_DIR, ROOTFS_DIR, APT_CACHE_DIR}


def _teardown(purge: bool = False) -> dict:
    names = set(HOSTS) | set(hosts()) | {CONTROL_NAME}
    # hosts' PID 1 first: SIGKILL to it ends its whole pid namespace at once
    for n in hosts():
        if not _is_legacy(n):
            with contextlib.suppress(Exception):
                _hosts.kill(n)
    table = processes()
    pids = lab_processes(table)
    n = kill_all(pids, what="lab processes")
    for p in list(_hosts._children.values()):  # reap our own
        with contextlib.suppress(Exception):
            p.poll()
    _hosts._children.clear()
    links = [l for l in _hosts.links() if l.startswith(NS_PREFIX)]
    for l in links:
        run(["ip", "link", "del", l], check=False)
    nss = [os.path.basename(f) for f in glob.glob(f"/run/netns/{NS_PREFIX}*")]
    for ns in nss:
        run(["ip", "netns", "del", ns])
    if BRIDGE in _hosts.links():
        run(["ip", "link", "del", BRIDGE])
    if os.path.isdir("/run/netns") and not os.listdir("/run/netns") and mounts_under(["/run/netns"]):
        run(["umount", "/run/netns"], check=False)  # iproute2's own bind mount, when no netns is left
    mounts = umount_all([str(LAB_DIR), str(RUN_DIR)])
    cgroups = _hosts.stale_cgroups()
    for cg in cgroups:
        _hosts.remove_cgroup_tree(cg)
    left_cg = [str(c) for c in _hosts.stale_cgroups()]
    if left_cg:
        raise LabError(f"cgroups still present after teardown: {left_cg[:5]}")
    # state
    if LAB_DIR.exists():
        for child in LAB_DIR.iterdir():
            if not purge and child in KEEP_ON_DOWN:
                continue
            _rm(child)
        if purge:
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
            os.rmdir(d)  # only when empty (the legacy hosts' mount points)
    for d in glob.glob("/etc/docker/certs.d/*"):
        if _is_lab_registry(os.path.basename(d), names):
            _rm(d)
    _clean_auth_file(Path("/root/.docker/config.json"), names)
    _clean_auth_file(Path(f"/run/containers/{os.getuid()}/auth.json"), names)
    left = [l for l in _hosts.links() if l.startswith(NS_PREFIX) or l == BRIDGE]
    if left:
        raise LabError(f"links still present after teardown: {left}")
    return {"processes": n, "links": len(links), "netns": len(nss), "mounts": len(mounts), "cgroups": len(cgroups)}


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
    legacy = not meta.get("systemd", True)
    r = {"address": meta["addr"], "running": False, "ssh": False, "hostname": None,
         "systemd": None if legacy else "offline"}
    if legacy:
        r["legacy"] = True
    try:
        host_pid(name)
        r["running"] = True
    except LabError as e:
        r["error"] = str(e)
    if r["running"] and not legacy:
        with contextlib.suppress(LabError):
            r["systemd"] = host_exec(name, ["systemctl", "is-system-running"], check=False,
                                     timeout=15).stdout.strip() or None
    try:
        if not r["running"]:  # not running: with the bridge gone, ssh would wait for its ConnectTimeout
            raise LabError("host not running")
        cp = run(ssh_argv(meta["addr"], "hostname"), check=False, timeout=15)
        r["hostname"] = cp.stdout.strip() or None
        r["ssh"] = cp.returncode == 0 and r["hostname"] == name
        if cp.returncode != 0:
            r["ssh_error"] = cp.stderr.strip()[-300:]
    except LabError as e:
        r["ssh_error"] = str(e)
    ok = r["running"] and r["ssh"] and (legacy or r["systemd"] == "running")
    if meta.get("ceph"):
        r["ceph_health"] = None
        if r["running"]:
            try:
                cp = host_exec(name, ["ceph", "--connect-timeout", "5", "health"], check=False, timeout=20)
                r["ceph_health"] = (cp.stdout.strip() or cp.stderr.strip()[-300:]) or None
            except LabError as e:
                r["ceph_health"] = str(e)[-300:]
        ok = ok and r["ceph_health"] == "HEALTH_OK"
    engine = "docker" if meta.get("docker") else "podman" if meta.get("role") == "podman" else None
    if engine:
        r[engine] = r["registry_image"] = False
        if r["running"]:
            try:
                cp = host_exec(name, [engine, "images", "--format", "{{.Repository}}:{{.Tag}}"],
                               check=False, timeout=20)
                r[engine] = cp.returncode == 0
                r["registry_image"] = bool({REGISTRY_IMAGE, f"docker.io/library/{REGISTRY_IMAGE}"}
                                           & set(cp.stdout.split()))
            except LabError as e:
                r[f"{engine}_error"] = str(e)[-300:]
        ok = ok and r[engine] and r["registry_image"]
    r["ok"] = bool(ok)
    return r


def _check_control() -> dict:
    r = {"address": CONTROL_ADDR, "bridge": BRIDGE in _hosts.links(), "docker": False,
         "apt_proxy": _proxy.running()}
    try:
        pid = int((CONTROL_DIR / "pid").read_text())
        r["docker"] = alive(pid) and _docker_ping(DOCKER_SOCK)
    except (OSError, ValueError):
        pass
    r["ok"] = r["bridge"] and r["docker"] and r["apt_proxy"]
    return r


def _base_meta(n: str) -> dict:
    role = ROLES[n]
    return {"name": n, "addr": HOSTS[n], "role": role, "systemd": True, "ceph": role == "ceph",
            "docker": role == "docker"}


def status() -> dict:
    """{"ok": bool, "hosts": {name: {...}}, "control": {...}, "processes": n, "rss_mb": float}.
    Each host: address, running, ssh, hostname, systemd (its `is-system-running`), and
    ceph_health / docker + registry_image by role."""
    metas = {n: _base_meta(n) for n in HOSTS}
    for n in hosts():
        m = _meta(n) or metas.get(n)
        if n in HOSTS:
            m = {**m, "ceph": metas[n]["ceph"], "docker": metas[n]["docker"]}
        metas[n] = m
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
        if h.get("systemd") not in (None, "running"):
            out.append(f"{n} systemd: {h['systemd']}")
        if not h["ssh"]:
            out.append(f"{n} ssh: {h.get('ssh_error') or h.get('hostname')}")
        if "ceph_health" in h and h["ceph_health"] != "HEALTH_OK":
            out.append(f"{n} ceph: {h['ceph_health']}")
        for engine in ("docker", "podman"):
            if engine in h and not (h[engine] and h["registry_image"]):
                out.append(f"{n} {engine}: {'no ' + REGISTRY_IMAGE if h[engine] else 'not answering'}")
    c = st["control"]
    if not c["ok"]:
        out.append("control: " + ", ".join(k for k in ("bridge", "docker", "apt_proxy") if not c[k]) + " down")
    return out


def _settled_status(grace: float = 10.0) -> dict:
    """status(), but when everything runs and only Ceph is not HEALTH_OK (a pool being created by a
    notebook peers for a second), give Ceph `grace` seconds to settle before calling it unhealthy."""
    st = status()
    only_ceph = not _base_ok(st) and all(p.split(" ", 2)[1] == "ceph:" for p in _problems(_base(st)))
    if only_ceph:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(1)
            st = status()
            if _base_ok(st):
                break
    return st


def _base(st: dict) -> dict:
    """status() of the lab itself: the fixed hosts and the control node, without added hosts."""
    return dict(st, hosts={n: h for n, h in st["hosts"].items() if n in HOSTS})


def _base_ok(st: dict) -> bool:
    return not _problems(_base(st)) and all(n in st["hosts"] for n in HOSTS)


def _looks_up() -> bool:
    return (all((_hosts.host_dir(n) / "pid").exists() for n in HOSTS) and (CONTROL_DIR / "pid").exists()
            and _proxy.pid() is not None)


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
            if _base_ok(st):
                # an added host in a bad state is its owner's business (add_host replaces a dead
                # one): rebuilding the lab for it would kill every other added host with it
                extra = _problems(st)
                _log(f"lab already up and healthy; nothing changed ({time.monotonic() - t0:.2f} s)"
                     + (f"; added hosts not healthy, left as they are: {'; '.join(extra)}" if extra else ""))
                return st
            _log("lab is not healthy (" + "; ".join(_problems(_base(st))) + "): rebuilding it")
        with _step("clear earlier lab"):
            _teardown()
        with _step("ssh keys"):
            _hosts.ensure_keys(list(HOSTS))
            LAB_DIR.mkdir(parents=True, exist_ok=True)
        with _step(f"bridge {BRIDGE} {CONTROL_ADDR}/{NETWORK.prefixlen}"):
            _hosts.bridge_up()
        with _step(f"apt proxy {CONTROL_ADDR}:{_proxy.PROXY_PORT}"):
            _proxy.start()
        cached = {r: _rootfs.have_image(r) for r in set(ROLES.values())}
        with _step("host images (" + ", ".join(f"{r}{' cached' if c else ''}" for r, c in sorted(cached.items()))
                   + ")"):
            _rootfs.ensure_images(ROLES.values())

        def host_up(n):
            with _step(f"host {n} {HOSTS[n]} ({ROLES[n]}: boot, systemd, ssh)"):
                _create_host(n, HOSTS[n], ROLES[n])
            if ROLES[n] == "ceph":
                with _step(f"ceph on {n}: mon, mgr, osd units"):
                    _ceph.bootstrap(_ceph_hx(n), lambda p: host_path(n, p), HOSTS[n], str(NETWORK), log=_log)
                m = _meta(n)
                m.update(ceph=True, conf_overrides={})
                _hosts.write_meta(n, m)
            if ROLES[n] == "docker":
                with _step(f"docker.service on {n}"):
                    _wait_host_docker(n)
                with _step(f"import {REGISTRY_IMAGE} on {n}"):
                    _import_registry(n)

        def control_up():
            with _step("dockerd on control"):
                _start_control_dockerd()
            with _step("build images"):
                _image_tar("registry")
                _image_tar("busybox")
            with _step(f"import {', '.join(CONTROL_IMAGES)} on control"):
                _import_registry(None)

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(HOSTS) + 1) as ex:
            futs = [ex.submit(host_up, n) for n in HOSTS] + [ex.submit(control_up)]
            errors = []
            for f in futs:
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 - report the first, after all have ended
                    errors.append(e)
            if errors:
                raise errors[0]
        _write_etc_hosts_everywhere()
        for n in HOSTS:
            if ROLES[n] == "ceph":
                with _step(f"ceph HEALTH_OK on {n}"):
                    _ceph.wait_healthy(_ceph_hx(n))
        with _step("final status"):
            st = status()
        if not st["ok"]:
            raise LabError("lab came up but status is not all green:\n" + _format_status(st))
        _log(f"lab up in {time.monotonic() - t0:.2f} s ({st['processes']} processes, {st['rss_mb']} MB RSS)")
        return st


def down(purge: bool = False) -> dict:
    """Stop and remove the lab (safe to run any number of times).  purge=True also removes the
    ssh keys in SSH_DIR (then KNOWN_HOSTS changes on the next up), the host images and the apt cache."""
    t0 = time.monotonic()
    with _locked():
        r = _teardown(purge=purge)
    _log(f"lab down in {time.monotonic() - t0:.2f} s: killed {r['processes']} processes, removed "
         f"{r['netns']} namespaces, {r['links']} veths, {r['cgroups']} cgroups, {r['mounts']} mounts"
         + ("; ssh keys, images and apt cache removed" if purge else f"; kept {SSH_DIR}, {ROOTFS_DIR}, {APT_CACHE_DIR}"))
    return r


# ------------------------------------------------------------------ CLI


def _format_status(st: dict) -> str:
    def yn(v):
        return "ok" if v else "NO"
    lines = []
    for n, h in st["hosts"].items():
        parts = [f"{n:<14} {h['address']:<12} ssh {yn(h['ssh'])}"]
        parts.append("legacy (no systemd)" if h.get("legacy") else f"systemd {h.get('systemd')}")
        if "ceph_health" in h:
            parts.append(f"ceph {h['ceph_health']}")
        for engine in ("docker", "podman"):
            if engine in h:
                parts.append(f"{engine} {yn(h[engine])}  {REGISTRY_IMAGE} {yn(h['registry_image'])}")
        if not h["running"]:
            parts.append("(not running)")
        elif h.get("ssh_error"):
            parts.append(f"({h['ssh_error']})")
        lines.append("  ".join(parts))
    c = st["control"]
    lines.append(f"{CONTROL_NAME:<14} {c['address']:<12} bridge {yn(c['bridge'])}  docker {yn(c['docker'])}  "
                 f"apt proxy {yn(c['apt_proxy'])}")
    lines.append(f"{st['processes']} processes, {st['rss_mb']} MB RSS")
    lines.append("ALL OK" if st["ok"] else "NOT OK")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runbook_lib.lab", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="bring the lab up (no-op when it is up and healthy)")
    d = sub.add_parser("down", help="stop the lab and remove its state")
    d.add_argument("--purge", action="store_true",
                   help=f"also remove the ssh keys in {SSH_DIR}, the host images and the apt cache")
    s = sub.add_parser("status", help="check every host; exit 1 unless all is well")
    s.add_argument("--json", action="store_true")
    rb = sub.add_parser("reboot", help="reboot a host (poweroff, boot the same disk)")
    rb.add_argument("name")
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
        if a.cmd == "reboot":
            print(json.dumps(reboot(a.name)))
            return 0
        st = status()
        print(json.dumps(st, indent=2) if a.json else _format_status(st))
        return 0 if st["ok"] else 1
    except LabError as e:
        print(f"lab {a.cmd} failed: {e}", file=sys.stderr)
        return 1
