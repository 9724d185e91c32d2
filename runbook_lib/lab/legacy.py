"""Hosts of the OLD kind (add_host(..., systemd=False)): the lab's hosts before they were real machines.

    ip netns exec rbl-NAME unshare --uts --mount --propagation private sh -c SCRIPT

Own network namespace, hostname and private tmpfs mounts on PRIVATE_DIRS, but the control
node's file system, users and dpkg database otherwise; no systemd: the long-lived process is
`sshd -D -e -f CFG` (root login with the lab key only; no k8s user).  A docker=True host gets its
own dockerd run directly (no unit).  They prove the runbook's no-systemd path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .proc import AUTHORIZED_KEYS, ETC_HOSTS, HOSTKEY_DIR, LabError, read_proc, wait_for
from . import hosts as H

PRIVATE_DIRS = ["/run", "/tmp", "/var/tmp", "/root", "/opt", "/srv", "/etc/ceph", "/etc/docker",
                "/etc/kubernetes", "/var/lib/ceph", "/var/log/ceph", "/var/lib/docker",
                "/var/lib/containers", "/var/lib/docker-registry"]
DOCKERD_FLAGS = ["--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
                 "--storage-driver=vfs"]
DOCKER_SOCK = "/var/run/docker.sock"


def host_pid(name: str) -> int:
    """The pid of a legacy host's sshd, its long-lived process (the anchor of its namespaces)."""
    try:
        pid = int((H.host_dir(name) / "pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise LabError(f"lab host {name!r} is not running (python -m runbook_lib.lab up)") from None
    p = read_proc(pid)
    if p is None or p.comm != "sshd" or p.state in ("Z", "X"):
        raise LabError(f"lab host {name!r} is not running: its sshd (pid {pid}) is gone "
                       f"(python -m runbook_lib.lab up)")
    return pid


def nsenter_argv(name: str) -> list[str]:
    return ["nsenter", "-t", str(host_pid(name)), "-n", "-m", "-u", "--"]


def anchor_pids(table) -> set[int]:
    """sshd processes of any legacy host (their config lives under LAB_DIR/hosts)."""
    marker = str(H.HOSTS_DIR) + "/"
    return {p.pid for p in table.values()
            if p.comm == "sshd" and any(a.startswith(marker) for a in p.cmdline)}


def _sshd_config(name: str, addr: str) -> str:
    d = H.host_dir(name)
    return f"""\
# legacy lab host {name}: written by runbook_lib.lab
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
SetEnv SHLVL=1
MaxStartups 100:30:200
MaxSessions 64
"""


def _cgroup_script() -> str:
    """Shell lines re-creating this machine's cgroup mounts inside a host (ip netns exec hides them)."""
    lines = []
    for mp, fstype, opts in H.cgroup_mounts():
        if mp == "/sys/fs/cgroup":
            return "mount -t cgroup2 cgroup2 /sys/fs/cgroup\n"
        if fstype == "cgroup":
            lines.append(f"mkdir -p {mp}; mount -t cgroup -o {opts} cgroup {mp}")
        else:
            lines.append(f"mkdir -p {mp}; mount -t cgroup2 cgroup2 {mp}")
    return "mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup\n" + "\n".join(lines) + "\n"


def _host_script(name: str, docker: bool) -> str:
    mounts = "\n".join(
        f"mkdir -p {d}; mount -t tmpfs -o mode={'1777' if d in ('/tmp', '/var/tmp') else '755'} "
        f"{H.ns_name(name)} {d}" for d in PRIVATE_DIRS)
    return f"""set -e
hostname {name}
{mounts}
chmod 700 /root
mount --bind {ETC_HOSTS} /etc/hosts
mkdir -p /run/sshd /run/ceph /run/lock /var/lib/ceph/tmp
{_cgroup_script() if docker else ''}
exec /usr/sbin/sshd -D -e -f {H.host_dir(name) / 'sshd_config'}
"""


def write_etc_hosts():
    """The one /etc/hosts every legacy host bind-mounts (rewritten in place: same inode)."""
    data = H.etc_hosts_text()
    with open(ETC_HOSTS, "a+") as f:
        f.seek(0)
        if f.read() != data:
            f.seek(0)
            f.truncate()
            f.write(data)


def start_host(name: str, addr: str, docker: bool = False):
    """Network, sshd (and dockerd) of a legacy host; its metadata must be written already."""
    d = H.host_dir(name)
    (d / "sshd_config").write_text(_sshd_config(name, addr))
    write_etc_hosts()
    H.net_up(name, addr)
    log = d / "sshd.log"
    p = H.spawn(["ip", "netns", "exec", H.ns_name(name), "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", _host_script(name, docker)], log)
    (d / "pid").write_text(str(p.pid))

    def listening():
        if p.poll() is not None:
            raise LabError(f"host {name}: setup/sshd exited with {p.returncode}:\n{H.tail(log)}")
        return H.tcp_open(addr, 22)
    wait_for(listening, 15, f"sshd of {name} on {addr}:22", detail=lambda: H.tail(log))
    if read_proc(p.pid).comm != "sshd":
        raise LabError(f"host {name}: pid {p.pid} is {read_proc(p.pid).comm}, not sshd")
    if docker:
        start_dockerd(name)


def start_dockerd(name: str):
    from . import _docker_ping
    d = H.host_dir(name)
    cfg = d / "daemon.json"
    cfg.write_text(json.dumps({"deprecated-key-path": "/etc/docker/key.json"}))
    log = d / "dockerd.log"
    p = H.spawn(nsenter_argv(name) + ["dockerd", *DOCKERD_FLAGS, "--data-root", "/var/lib/docker",
                                     "--exec-root", "/var/run/docker", "--pidfile", "/var/run/docker.pid",
                                     "--config-file", cfg, "-H", f"unix://{DOCKER_SOCK}"], log)
    (d / "dockerd.pid").write_text(str(p.pid))
    sock = H.host_path(name, DOCKER_SOCK)

    def up_():
        if p.poll() is not None:
            raise LabError(f"dockerd on {name} exited with {p.returncode}:\n{H.tail(log)}")
        return _docker_ping(sock)
    wait_for(up_, 30, f"dockerd on {name}", detail=lambda: H.tail(log))


def restart_docker(name: str, timeout: float = 60) -> None:
    """dockerd stopped the way a shutdown stops it (SIGTERM: it stops the containers), then started
    again as at boot (containers with a restart policy come back)."""
    import contextlib
    import signal
    pid = int((H.host_dir(name) / "dockerd.pid").read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)

    def gone():  # exited (a zombie until whoever started it reaps it counts as exited)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        return stat[stat.rindex(")") + 2] == "Z"
    wait_for(gone, timeout, f"dockerd on {name} to stop")
    start_dockerd(name)
