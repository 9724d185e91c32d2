"""Root file systems of the lab's hosts: Debian images built with mmdebstrap, one per role.

    base    systemd, sshd, sudo, python3, curl, ... (a minimal Debian 12 server)
    ceph    base + ceph-mon ceph-osd ceph-mgr ceph-common (NOT radosgw: 01-rgw installs it)
    docker  base + docker.io (vfs storage, no iptables/bridge), docker.service enabled
    podman  base + podman (vfs storage) and NO docker: the RHEL/Rocky-style registry host

The mirror is whatever this machine's own apt uses (/etc/apt/sources.list.d/debian.sources, read
at run time); packages come through the lab's apt proxy, so a host's later `apt-get install` of
the same packages is served from its cache.  An image lives in LAB_DIR/rootfs/<role>-<hash>
(hash of the package list, the sources and RECIPE_VERSION) and is rebuilt when that changes.
Images are the read-only lower layer of every host's overlay: never change one in place.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

from .proc import CONTROL_ADDR, HOSTS_DIR, PROXY_PORT, ROOTFS_DIR, SSH_USER, LabError, log, run

RECIPE_VERSION = 3
SOURCES_FILE = Path("/etc/apt/sources.list.d/debian.sources")

BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "sudo", "python3", "curl",
                 "ca-certificates", "iproute2", "procps", "less"]
ROLE_PACKAGES = {
    "base": BASE_PACKAGES,
    "ceph": BASE_PACKAGES + ["ceph-mon", "ceph-osd", "ceph-mgr", "ceph-common"],
    "docker": BASE_PACKAGES + ["docker.io"],
    # Debian's podman 4.3 with what a server install brings (conmon, crun, netavark through
    # containers-common): no docker at all, as on RHEL/Rocky/Alma hosts.
    "podman": BASE_PACKAGES + ["podman", "crun", "netavark", "aardvark-dns", "catatonit", "uidmap"],
}
# overlay over the host's own overlay root is refused by the kernel: vfs, as docker's daemon.json
PODMAN_STORAGE_CONF = '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n'

DOCKER_DAEMON_JSON = {"storage-driver": "vfs", "iptables": False, "ip-forward": False, "ip-masq": False,
                      "bridge": "none"}

# Units masked in every image: they fail in a host (a file on /dev/console, no udev, read-only
# /sys), or could change THIS machine (the hosts share its kernel: clock, sysctls, modules,
# binfmt), or would run apt/dpkg at random times under the tests.
MASKED_UNITS = [
    "chrony.service", "systemd-timesyncd.service", "ntp.service", "ntpsec.service", "openntpd.service",
    "console-getty.service", "nvmf-autoconnect.service", "nvmefc-boot-connections.service",
    "systemd-sysctl.service", "systemd-modules-load.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-hwdb-update.service", "systemd-firstboot.service", "systemd-pstore.service",
    "sys-kernel-config.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount", "getty@tty1.service", "serial-getty@.service",
    "apt-daily.timer", "apt-daily-upgrade.timer", "apt-daily.service", "apt-daily-upgrade.service",
    "man-db.timer", "dpkg-db-backup.timer", "fstrim.timer", "e2scrub_all.timer", "e2scrub_reap.service",
    "lvm2-monitor.service", "lvm2-lvmpolld.socket", "dm-event.socket", "blk-availability.service",
    "smartmontools.service", "smartd.service", "ceph-volume@.service",
]


def mirror_sources() -> str:
    """This machine's Debian sources (deb822), the mirror every image and host uses."""
    try:
        text = SOURCES_FILE.read_text()
    except OSError as e:
        raise LabError(f"cannot read {SOURCES_FILE} (the lab uses this machine's Debian mirror): {e}") from None
    if "URIs:" not in text:
        raise LabError(f"{SOURCES_FILE} lists no URIs")
    return text


def mirror_uris(sources: str | None = None) -> list[tuple[str, list[str]]]:
    """[(uri, [suites])] from the deb822 sources text."""
    out = []
    for para in re.split(r"\n\s*\n", sources if sources is not None else mirror_sources()):
        fields = {}
        for line in para.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.split()
        if "deb" in fields.get("types", ["deb"]):
            for uri in fields.get("uris", []):
                out.append((uri.rstrip("/"), fields.get("suites", [])))
    return out


def codename() -> str:
    with open("/etc/os-release") as f:
        for line in f:
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    raise LabError("no VERSION_CODENAME in /etc/os-release")


def proxy_line() -> str:
    return f'Acquire::http::Proxy "http://{CONTROL_ADDR}:{PROXY_PORT}";\n'


def image_key(role: str) -> str:
    key = {"packages": ROLE_PACKAGES[role], "recipe": RECIPE_VERSION, "sources": mirror_sources(),
           "masked": MASKED_UNITS, "daemon.json": DOCKER_DAEMON_JSON if role == "docker" else None,
           "suite": codename()}
    if role == "podman":  # only there: the other roles keep the keys (and cached images) they had
        key["storage.conf"] = PODMAN_STORAGE_CONF
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    return f"{role}-{h.hexdigest()[:12]}"


def image_dir(role: str) -> Path:
    return ROOTFS_DIR / image_key(role)


def have_image(role: str) -> bool:
    return (image_dir(role) / ".lab-image").exists()


_build_locks = {r: threading.Lock() for r in ROLE_PACKAGES}


def ensure_image(role: str) -> Path:
    """The image for role (built now when missing or out of date).  Thread-safe per role."""
    if role not in ROLE_PACKAGES:
        raise LabError(f"unknown host role {role!r} (one of {', '.join(ROLE_PACKAGES)})")
    with _build_locks[role]:
        d = image_dir(role)
        if (d / ".lab-image").exists():
            return d
        ROOTFS_DIR.mkdir(parents=True, exist_ok=True)
        in_use = images_in_use()
        for old in ROOTFS_DIR.glob(f"{role}-*"):   # other versions of this role, half-built ones
            if old.name not in in_use:  # never under a running host: it is that host's root
                shutil.rmtree(old, ignore_errors=True)
        tmp = ROOTFS_DIR / f".build-{d.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        t = time.monotonic()
        try:
            _build(role, tmp)
            os.rename(tmp, d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"  image {d.name} built in {time.monotonic() - t:.1f} s")
        return d


def images_in_use() -> set[str]:
    """Names of the images some host's overlay is built on (its host.json says which)."""
    out = set()
    for meta in HOSTS_DIR.glob("*/host.json"):
        try:
            image = json.loads(meta.read_text()).get("image")
        except (OSError, ValueError):
            continue
        if image:
            out.add(Path(image).name)
    return out


def ensure_images(roles) -> dict[str, Path]:
    roles = sorted(set(roles))
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(roles) or 1) as ex:
        futs = {r: ex.submit(ensure_image, r) for r in roles}
        return {r: f.result() for r, f in futs.items()}


def _build(role: str, dest: Path):
    hook_dir = dest.with_name(dest.name + ".hooks")
    shutil.rmtree(hook_dir, ignore_errors=True)
    hook_dir.mkdir(parents=True)
    sources = hook_dir / "debian.sources"
    sources.write_text(mirror_sources())
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
            "--include=" + ",".join(ROLE_PACKAGES[role]),
            "--aptopt=" + proxy_line().strip().rstrip(";"),
            "--aptopt=APT::Install-Recommends \"false\"",
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
            ]
    if role == "docker":
        (hook_dir / "daemon.json").write_text(json.dumps(DOCKER_DAEMON_JSON) + "\n")
        argv.append(f'--setup-hook=mkdir -p "$1/etc/docker" && cp {hook_dir / "daemon.json"} "$1/etc/docker/daemon.json"')
    argv += [codename(), str(dest), str(sources)]
    try:
        run(argv, timeout=1800, what=f"mmdebstrap ({role} image)",
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                 "HOME": "/root", "TMPDIR": str(hook_dir)})
        _finish(role, dest)
    finally:
        shutil.rmtree(hook_dir, ignore_errors=True)


def _finish(role: str, r: Path):
    """What every host of this role has, whatever its name: apt through the proxy with this
    machine's sources, masked units, the k8s user, no host keys or machine id of the build."""
    etc = r / "etc"
    # apt: the control node's sources, through the proxy; recommends as on any Debian host
    for f in (etc / "apt" / "sources.list.d").iterdir():
        f.unlink()
    (etc / "apt" / "sources.list").unlink(missing_ok=True)
    (etc / "apt" / "sources.list.d" / "debian.sources").write_text(mirror_sources())
    for f in (etc / "apt" / "apt.conf.d").glob("99mmdebstrap"):
        f.unlink()
    (etc / "apt" / "apt.conf.d" / "01lab-proxy").write_text(proxy_line())
    for u in MASKED_UNITS:
        link = etc / "systemd" / "system" / u
        if not (link.is_symlink() and os.readlink(link) == "/dev/null"):
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
    for k in (etc / "ssh").glob("ssh_host_*"):
        k.unlink()
    (etc / "machine-id").write_text("")   # each host gets its own before its first boot
    (r / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    run(["chroot", str(r), "useradd", "-m", "-s", "/bin/bash", "-U", SSH_USER], what="useradd")
    # a locked password ('!') would stop sshd/PAM from letting k8s in even by key; '*' = no password
    run(["chroot", str(r), "usermod", "-p", "*", SSH_USER], what="usermod")
    ssh_dir = r / "home" / SSH_USER / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    st = os.stat(ssh_dir.parent)
    os.chown(ssh_dir, st.st_uid, st.st_gid)
    if role == "docker":
        want = etc / "systemd/system/multi-user.target.wants/docker.service"
        if not want.exists():
            run(["chroot", str(r), "systemctl", "enable", "docker.service"], what="enable docker")
    if role == "podman":
        (etc / "containers").mkdir(exist_ok=True)
        (etc / "containers" / "storage.conf").write_text(PODMAN_STORAGE_CONF)
    for f in (r / "var/cache/apt/archives").glob("*.deb"):
        f.unlink()
    (r / ".lab-image").write_text(json.dumps({"role": role, "packages": ROLE_PACKAGES[role],
                                               "recipe": RECIPE_VERSION, "built": time.time()}) + "\n")
