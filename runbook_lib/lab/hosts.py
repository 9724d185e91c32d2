"""Lab hosts as real machines: a Debian 12 system each, booted with systemd as PID 1.

A host NAME at ADDR:

    network   netns rbl-NAME (a file in /run/netns), veth rbl-NAME on bridge rblab0 <-> eth0
              inside, fixed MACs derived from the address
    root fs   overlayfs lowerdir=LAB_DIR/rootfs/<role>-<hash> (read-only image),
              upperdir/workdir LAB_DIR/hosts/NAME/{upper,work}; mounted only inside the host's
              own mount namespace (it goes when the host goes, nothing to unmount outside)
    cgroups   lab-NAME under every cgroup controller of this machine; the host's cgroup
              namespace is rooted there
    boot      in the netns: unshare --cgroup --pid --fork --mount --uts --ipc; fresh proc,
              read-only sysfs, cgroup mounts, private /dev (its console a log file,
              LAB_DIR/hosts/NAME/console.log), tmpfs /run and /tmp; pivot_root into the
              overlay (not chroot: see _boot_scripts), exec /lib/systemd/systemd, container=lab
    before    /etc/hostname, /etc/hosts, /etc/machine-id, the host's persistent SSH host key
     boot     (SSH_DIR/hostkeys/NAME), sshd drop-in, k8s's authorized_keys and sudoers rule
    stop      SIGRTMIN+4 to its systemd (poweroff); SIGKILL when it must be quick

host_pid() is the host's systemd as seen from here; host_exec() enters all its namespaces.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

from .proc import (AUTHORIZED_KEYS, BRIDGE, CGROUP_PREFIX, CLEAN_ENV, CONTROL_ADDR, CONTROL_NAME, HOSTKEY_DIR,
                   HOSTS_DIR, KNOWN_HOSTS, NETWORK, NS_PREFIX, SSH_DIR, SSH_KEY, SSH_USER, LabError, alive,
                   read_proc, run, wait_for)

SIGPOWEROFF = signal.SIGRTMIN + 4
SSH_OPTS = ["-F", "/dev/null", "-i", str(SSH_KEY), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={KNOWN_HOSTS}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            "-o", "LogLevel=ERROR"]

# ------------------------------------------------------------------ names, metadata


def ns_name(name: str) -> str:
    return NS_PREFIX + name


def veth_name(name: str) -> str:
    v = NS_PREFIX + name
    return v if len(v) <= 15 else NS_PREFIX + hashlib.sha1(name.encode()).hexdigest()[:11]


def host_dir(name: str) -> Path:
    return HOSTS_DIR / name


def meta(name: str) -> dict | None:
    try:
        return json.loads((host_dir(name) / "host.json").read_text())
    except (OSError, ValueError):
        return None


def write_meta(name: str, m: dict):
    d = host_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "host.json.tmp"
    tmp.write_text(json.dumps(m, indent=1) + "\n")
    os.replace(tmp, d / "host.json")


def hosts() -> dict[str, str]:
    """All hosts of the lab (the base ones plus those added): name -> address."""
    out = {}
    if HOSTS_DIR.is_dir():
        for d in sorted(HOSTS_DIR.iterdir()):
            m = meta(d.name)
            if m:
                out[m["name"]] = m["addr"]
    return out


def links() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def mac(addr: str, kind: int) -> str:
    """A fixed, locally administered MAC derived from an address: a host re-created at the same
    address keeps its MAC, so ARP caches on the bridge and in the other hosts stay right."""
    return ":".join(f"{b:02x}" for b in (0x02, kind, *ipaddress.ip_address(addr).packed))


def tcp_open(addr: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------ keys, known_hosts, /etc/hosts


def ensure_keys(names):
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


def _by_addr(items):
    return sorted(items, key=lambda x: ipaddress.ip_address(x[1]))


_known_hosts_lock = threading.Lock()


def write_known_hosts():
    """KNOWN_HOSTS = every lab host's key under its address and its name."""
    with _known_hosts_lock:   # hosts boot in threads: the last writer must see every host
        lines = []
        for n, a in _by_addr(hosts().items()):
            try:
                kt, key = (HOSTKEY_DIR / f"{n}.pub").read_text().split()[:2]
            except OSError:
                continue
            lines += [f"{a} {kt} {key}", f"{n} {kt} {key}"]
        KNOWN_HOSTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = KNOWN_HOSTS.with_name(f".known_hosts.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""))
        os.replace(tmp, KNOWN_HOSTS)


def etc_hosts_text(name: str | None = None) -> str:
    lines = ["127.0.0.1\tlocalhost"]
    lines += ["::1\tlocalhost ip6-localhost ip6-loopback", "ff02::1\tip6-allnodes", "ff02::2\tip6-allrouters",
              f"{CONTROL_ADDR}\t{CONTROL_NAME}"]
    lines += [f"{a}\t{n}" for n, a in _by_addr(hosts().items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ network


def bridge_up():
    for line in run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines():
        f = line.split()
        if len(f) > 3 and f[1] != BRIDGE and ipaddress.ip_interface(f[3]).network.overlaps(NETWORK):
            raise LabError(f"interface {f[1]} already holds {f[3]}, inside the lab network {NETWORK}: "
                           f"remove it first (ip link del {f[1]})")
    if not Path(f"/sys/class/net/{BRIDGE}").exists():
        # a fixed MAC: a bridge otherwise takes its lowest port's MAC, which changes as hosts come and go
        run(["ip", "link", "add", BRIDGE, "address", mac(CONTROL_ADDR, 0), "type", "bridge"])
    have = run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE]).stdout
    if f" {CONTROL_ADDR}/" not in have:
        run(["ip", "addr", "add", f"{CONTROL_ADDR}/{NETWORK.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def net_up(name: str, addr: str):
    """netns + veth on the bridge, addresses and links up (before anything talks to addr)."""
    ns, veth = ns_name(name), veth_name(name)
    if veth in links():
        run(["ip", "link", "del", veth], check=False)
    if os.path.exists(f"/run/netns/{ns}"):
        run(["ip", "netns", "del", ns], check=False)
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", veth, "address", mac(addr, 1), "type", "veth",
         "peer", "name", "eth0", "address", mac(addr, 0), "netns", ns])
    run(["ip", "neigh", "flush", "to", addr, "dev", BRIDGE], check=False)
    run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{addr}/{NETWORK.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def net_down(name: str):
    if veth_name(name) in links():
        run(["ip", "link", "del", veth_name(name)], check=False)
    if os.path.exists(f"/run/netns/{ns_name(name)}"):
        run(["ip", "netns", "del", ns_name(name)], check=False)


# ------------------------------------------------------------------ cgroups


def cgroup_mounts() -> list[tuple[str, str, str]]:
    """[(mount point, fstype, options for a fresh mount)] of this machine's cgroup hierarchies."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mp = left.split()[4]
            fstype, _src, sopts = right.split()[:3]
            if fstype not in ("cgroup", "cgroup2"):
                continue
            if mp != "/sys/fs/cgroup" and not mp.startswith("/sys/fs/cgroup/"):
                continue
            opts = [o for o in sopts.split(",") if o not in ("rw", "ro") and not o.startswith("clone_children")]
            if fstype == "cgroup" and any(o.startswith("name=") for o in opts) and "none" not in opts:
                opts.insert(0, "none")
            out.append((mp, fstype, ",".join(opts)))
    if not out:
        raise LabError("no cgroup mounts under /sys/fs/cgroup on this machine: systemd cannot run in a host")
    return out


def cgroup_dirs(name: str) -> list[Path]:
    return [Path(mp) / (CGROUP_PREFIX + name) for mp, _t, _o in cgroup_mounts()]


def make_cgroups(name: str) -> list[Path]:
    dirs = []
    for mp, _t, _o in cgroup_mounts():
        d = Path(mp) / (CGROUP_PREFIX + name)
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):
            if (d / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((Path(mp) / f).read_text())
        dirs.append(d)
    return dirs


def remove_cgroup_tree(top: Path):
    """rmdir a cgroup and everything below it, deepest first (processes must be gone)."""
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda x: -x[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def remove_cgroups(name: str, keep_top: bool = False):
    for d in cgroup_dirs(name):
        if keep_top:
            for sub in [p for p in d.iterdir() if p.is_dir()] if d.is_dir() else []:
                remove_cgroup_tree(sub)
        else:
            remove_cgroup_tree(d)


def stale_cgroups() -> list[Path]:
    """Every lab-* cgroup under every controller (also of an earlier lab)."""
    out = []
    for mp, _t, _o in cgroup_mounts():
        out += [Path(p) for p in glob.glob(f"{mp}/{CGROUP_PREFIX}*") if os.path.isdir(p)]
    return out


def cgroup_pids(name: str | None = None) -> set[int]:
    """Processes in a host's cgroups (any host's when name is None)."""
    pids = set()
    for mp, _t, _o in cgroup_mounts():
        pattern = f"{mp}/{CGROUP_PREFIX}{name if name else '*'}"
        for top in glob.glob(pattern):
            for dirpath, _dirs, files in os.walk(top):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError, ValueError):
                        pids |= {int(x) for x in open(os.path.join(dirpath, "cgroup.procs")).read().split()}
        break  # one hierarchy is enough: every process is in exactly one cgroup of each
    return pids


# ------------------------------------------------------------------ the host's files before boot


def sshd_dropin(name: str) -> str:
    return f"""\
# lab host {name}: written by runbook_lib.lab before every boot
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
MaxStartups 100:30:200
MaxSessions 64
"""


def sudoers(sudo: str) -> str:
    if sudo == "nopasswd":
        return f"# lab: {SSH_USER} may run anything as root without a password\n{SSH_USER} ALL=(ALL) NOPASSWD:ALL\n"
    if sudo == "password":
        return f"# lab: {SSH_USER} may run anything as root with its password\n{SSH_USER} ALL=(ALL:ALL) ALL\n"
    raise LabError(f"sudo must be 'nopasswd' or 'password', not {sudo!r}")


def _passwd_ids(image: Path, user: str) -> tuple[int, int]:
    for line in (image / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == user:
            return int(f[2]), int(f[3])
    raise LabError(f"no user {user} in {image}/etc/passwd")


def stage_files(name: str, m: dict) -> list[tuple[Path, str, int, int, int]]:
    """[(staged file, path in the host, mode, uid, gid)] installed into the root before each boot."""
    d = host_dir(name)
    st = d / "stage"
    shutil.rmtree(st, ignore_errors=True)
    st.mkdir(parents=True)
    mid = d / "machine-id"
    if not mid.exists():
        mid.write_text(uuid.uuid4().hex + "\n")
    uid, gid = _passwd_ids(Path(m["image"]), SSH_USER)
    files = [
        ("hostname", "/etc/hostname", name + "\n", 0o644, 0, 0),
        ("hosts", "/etc/hosts", etc_hosts_text(name), 0o644, 0, 0),
        ("machine-id", "/etc/machine-id", mid.read_text(), 0o444, 0, 0),
        ("hostkey", "/etc/ssh/ssh_host_ed25519_key", (HOSTKEY_DIR / name).read_text(), 0o600, 0, 0),
        ("hostkey.pub", "/etc/ssh/ssh_host_ed25519_key.pub", (HOSTKEY_DIR / f"{name}.pub").read_text(), 0o644, 0, 0),
        ("sshd.conf", "/etc/ssh/sshd_config.d/lab.conf", sshd_dropin(name), 0o644, 0, 0),
        ("sudoers", f"/etc/sudoers.d/{SSH_USER}", sudoers(m.get("sudo", "nopasswd")), 0o440, 0, 0),
        ("authorized_keys", f"/home/{SSH_USER}/.ssh/authorized_keys", SSH_KEY.with_suffix(".pub").read_text(),
         0o600, uid, gid),
    ]
    out = []
    for fname, path, text, mode, u, g in files:
        (st / fname).write_text(text)
        out.append((st / fname, path, mode, u, g))
    return out


# ------------------------------------------------------------------ boot, pid, stop


def _boot_scripts(name: str, m: dict) -> tuple[str, str]:
    d = host_dir(name)
    root = d / "root"
    q = shlex.quote
    cg_procs = " ".join(q(str(p / "cgroup.procs")) for p in cgroup_dirs(name))
    outer = f"""set -e
# the starter shell joins the host's cgroups; unshare then roots the cgroup namespace there
for f in {cg_procs}; do echo $$ > "$f"; done
exec unshare --cgroup --pid --fork --mount --uts --ipc --propagation private bash {q(str(d / 'boot-inner.sh'))}
"""
    installs = "\n".join(f"install -D -m {mode:o} -o {u} -g {g} {q(str(src))} \"$R\"{q(path)}"
                         for src, path, mode, u, g in stage_files(name, m))
    cg_mounts = []
    for mp, fstype, opts in cgroup_mounts():
        if mp == "/sys/fs/cgroup":   # pure cgroup2 machine
            cg_mounts = [f'mount -t cgroup2 -o {opts or "rw"} cgroup2 "$R/sys/fs/cgroup"']
            break
        sub = mp[len("/sys/fs/cgroup/"):]
        if fstype == "cgroup2":
            cg_mounts.append(f'mkdir -p "$R/sys/fs/cgroup/{sub}"; mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup/{sub}"')
        else:
            cg_mounts.append(f'mkdir -p "$R/sys/fs/cgroup/{sub}"; mount -t cgroup -o {opts} cgroup "$R/sys/fs/cgroup/{sub}"')
    if not cg_mounts[0].startswith('mount -t cgroup2 -o'):
        cg_mounts.insert(0, 'mount -t tmpfs -o mode=755,nosuid,nodev,noexec cgroup "$R/sys/fs/cgroup"')
    cg = "\n".join(cg_mounts)
    inner = f"""set -e
R={q(str(root))}
# do not keep other hosts' network namespaces alive through our copy of /run/netns
umount -l /run/netns 2>/dev/null || true
mount -t overlay overlay -o lowerdir={q(m['image'])},upperdir={q(str(d / 'upper'))},workdir={q(str(d / 'work'))} "$R"
# this host's own files (hostname, hosts, machine id, ssh host key, sshd, sudo, k8s's key)
{installs}
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
{cg}
mount -t tmpfs -o mode=755,nosuid,nodev,size=20% tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mount -t tmpfs -o mode=755,nosuid,size=4m dev "$R/dev"
cd "$R/dev"
mknod -m 666 null c 1 3; mknod -m 666 zero c 1 5; mknod -m 666 full c 1 7
mknod -m 666 random c 1 8; mknod -m 666 urandom c 1 9; mknod -m 666 tty c 5 0
mkdir -m 755 pts; mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts pts; ln -s pts/ptmx ptmx
mkdir -m 1777 shm; mount -t tmpfs -o mode=1777,nosuid,nodev shm shm
mkdir -m 755 mqueue; mount -t mqueue mqueue mqueue
ln -s /proc/self/fd fd; ln -s /proc/self/fd/0 stdin; ln -s /proc/self/fd/1 stdout; ln -s /proc/self/fd/2 stderr
touch console; mount --bind {q(str(d / 'console.log'))} console
hostname {q(name)}
# pivot_root, not chroot: the host's root must be its mount namespace's root, or whatever joins
# that namespace later (runc exec: `docker exec`) lands on THIS machine's root file system
cd "$R"
pivot_root . .
umount -l .
cd /
export container=lab
exec /lib/systemd/systemd
"""
    return outer, inner


_children: dict[int, subprocess.Popen] = {}


def spawn(argv: list, logf: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a long-lived process detached from us (own session: it outlives `lab up`), its
    output appended to logf; remembered so that teardown can reap it."""
    with open(logf, "ab") as lf:
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=lf,
                             stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                             env=env or CLEAN_ENV)
    _children[p.pid] = p
    return p


def boot(name: str, timeout: float = 30) -> int:
    """Start host `name` (its netns must exist).  Returns its systemd's pid once it runs."""
    m = meta(name)
    d = host_dir(name)
    for sub in ("upper", "work", "root"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "console.log").touch()
    make_cgroups(name)
    outer, inner = _boot_scripts(name, m)
    (d / "boot-outer.sh").write_text(outer)
    (d / "boot-inner.sh").write_text(inner)
    log = d / "boot.log"
    p = spawn(["nsenter", f"--net=/run/netns/{ns_name(name)}", "bash", d / "boot-outer.sh"], log)

    def systemd_pid():
        if p.poll() is not None:
            raise LabError(f"host {name}: boot exited with {p.returncode}:\n{tail(log)}\n{tail(d / 'console.log')}")
        kids = _children_of(p.pid)
        for k in kids:
            pr = read_proc(k)
            if pr and pr.comm == "systemd":
                return pr
        return None
    pr = wait_for(systemd_pid, timeout, f"systemd of {name} to start", detail=lambda: tail(log))
    (d / "pid").write_text(f"{pr.pid} {pr.starttime}\n")
    return pr.pid


def _children_of(pid: int) -> list[int]:
    out = []
    for t in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError, ValueError):
            out += [int(x) for x in open(t).read().split()]
    return out


def host_pid(name: str) -> int:
    """The pid (seen from here) of host `name`'s systemd, its PID 1."""
    m = meta(name)
    if m is not None and not m.get("systemd", True):
        from . import legacy
        return legacy.host_pid(name)
    try:
        pid, start = (int(x) for x in (host_dir(name) / "pid").read_text().split()[:2])
    except (OSError, ValueError):
        raise LabError(f"lab host {name!r} is not running (python -m runbook_lib.lab up)") from None
    p = read_proc(pid)
    if p is None or p.comm != "systemd" or p.starttime != start or p.state in ("Z", "X"):
        raise LabError(f"lab host {name!r} is not running: its systemd (pid {pid}) is gone "
                       f"(python -m runbook_lib.lab up)")
    return pid


def running(name: str) -> bool:
    try:
        host_pid(name)
        return True
    except LabError:
        return False


def nsenter_argv(name: str) -> list[str]:
    m = meta(name)
    if m is not None and not m.get("systemd", True):
        from . import legacy
        return legacy.nsenter_argv(name)
    return ["nsenter", "-t", str(host_pid(name)), "-m", "-n", "-i", "-C", "-p", "-u", "-r", "-w", "--"]


def host_exec(name: str, argv: list[str], check: bool = True, input=None, timeout: float | None = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run argv as root inside lab host `name` (all its namespaces, its root file system), like a
    root login would (clean environment, HOME=/root), without ssh.  Output is captured as text
    (bytes when `input` is bytes).  A non-zero exit raises LabError unless check=False."""
    return run(nsenter_argv(name) + list(argv), check=check, input=input, timeout=timeout,
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


def ssh_argv(name_or_addr: str, *command: str, user: str | None = None) -> list[str]:
    """An OpenSSH command line that logs into a lab host with the lab key, checking its host key
    strictly against KNOWN_HOSTS.  user: default SSH_USER (k8s); root on a legacy host."""
    hs = hosts()
    addr = hs.get(name_or_addr) or name_or_addr
    if user is None:
        name = name_or_addr if name_or_addr in hs else next((n for n, a in hs.items() if a == addr), None)
        m = meta(name) if name else None
        user = "root" if (m is not None and not m.get("systemd", True)) else SSH_USER
    return ["ssh", *SSH_OPTS, f"{user}@{addr}", *command]


def wait_ready(name: str, timeout: float = 60, sudo_check: bool = True) -> dict:
    """Wait until the host's systemd says `running` (`degraded` fails with the failed units),
    sshd answers and `ssh k8s@ADDR sudo -n true` works.  Returns timings."""
    m = meta(name)
    addr = m["addr"]
    t0 = time.monotonic()
    deadline = t0 + timeout
    times = {}

    def state():
        host_pid(name)   # raises when it died
        cp = host_exec(name, ["systemctl", "is-system-running"], check=False, timeout=10)
        s = cp.stdout.strip()
        if s in ("running", "degraded", "maintenance", "stopping"):
            return s
        return None
    s = wait_for(state, timeout, f"systemd of {name} to finish booting",
                 detail=lambda: tail(host_dir(name) / "console.log"))
    if s != "running":
        failed = host_exec(name, ["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout.strip()
        raise LabError(f"host {name}: systemd is {s}; failed units:\n{failed}")
    times["systemd"] = time.monotonic() - t0
    wait_for(lambda: tcp_open(addr, 22), max(1.0, deadline - time.monotonic()), f"sshd of {name} on {addr}:22")
    times["sshd"] = time.monotonic() - t0
    probe = ["sudo", "-n", "true"] if sudo_check else ["true"]

    def login():
        cp = run(ssh_argv(addr, *probe, user=SSH_USER), check=False, timeout=15)
        if cp.returncode == 0:
            return True
        login.err = cp.stderr.strip()
        return False
    login.err = ""
    wait_for(login, max(1.0, deadline - time.monotonic()), f"ssh {SSH_USER}@{addr} {' '.join(probe)}",
             detail=lambda: login.err)
    times["ssh"] = time.monotonic() - t0
    return times


def poweroff(name: str, timeout: float = 20) -> bool:
    """systemd's poweroff (SIGRTMIN+4); SIGKILL after `timeout`.  True when it went by itself."""
    try:
        pid = host_pid(name)
    except LabError:
        return True
    os.kill(pid, SIGPOWEROFF)
    try:
        wait_for(lambda: not alive(pid), timeout, f"host {name} to power off")
        clean = True
    except LabError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 10, f"host {name} to die")
        clean = False
    _wait_pidns_empty(name)
    return clean


def kill(name: str):
    """Stop the host at once (SIGKILL to its PID 1 ends every process of its pid namespace)."""
    try:
        pid = host_pid(name)
    except LabError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 10, f"host {name} to die")
    _wait_pidns_empty(name)


def _wait_pidns_empty(name: str):
    wait_for(lambda: not {p for p in cgroup_pids(name) if alive(p)}, 10, f"processes of {name} to exit")
    for pid, p in list(_children.items()):
        if p.poll() is not None:
            _children.pop(pid, None)
    (host_dir(name) / "pid").unlink(missing_ok=True)
