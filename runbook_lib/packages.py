"""Debian packages on a host: a fact (installed version) and an operation (install).

Shared by the sections that install something (01-rgw: radosgw, 04-registry: docker-registry).
A fresh host often has no package lists at all (cloud and debootstrap images ship without
them): `apt-get update` runs first when the lists are missing or the package is unknown.
"""
from __future__ import annotations

from .errors import RunbookError
from .host import Command, cmd

# Never a prompt: a conffile we wrote before the install (config.yml) is kept as it is.
APT_INSTALL = ("DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
               "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold {pkgs}")


class PackageError(RunbookError):
    """A package cannot be installed on a host."""


def installed(h, package: str) -> str | None:
    """The installed version of a Debian package, or None (a read)."""
    r = h.run(cmd("dpkg-query -W -f='${{Status}} ${{Version}}' {p} 2>/dev/null", p=package), read=True, check=False)
    if r.exit_code == 0 and r.stdout.startswith("install ok installed"):
        return r.stdout.split()[-1]
    return None


def has_apt(h) -> bool:
    return h.test(Command("command -v apt-get >/dev/null"))


def install(h, packages: list[str], *, hint: str = "", timeout: float = 900) -> list[str]:
    """Install the packages that are missing (idempotent).  Returns those it installed
    (or would install, in dry-run)."""
    missing = [p for p in packages if installed(h, p) is None]
    if not missing:
        return []
    if not has_apt(h):
        raise PackageError(f"{', '.join(missing)} not installed on {h.name}, and it has no apt-get",
                           hint or "install them with the host's package manager, then run again")
    lists = h.run(Command("ls /var/lib/apt/lists/ 2>/dev/null | grep -c '_Packages' || true"), read=True)
    known = h.run(cmd("apt-cache policy {p} 2>/dev/null | grep -c 'Candidate: [0-9]' || true", p=missing),
                  read=True).stdout.strip()
    if lists.stdout.strip() in ("", "0") or known != str(len(missing)):
        h.run(Command("DEBIAN_FRONTEND=noninteractive apt-get update -q"), timeout=timeout, changed=False,
              hint="check the host's apt sources and proxy (/etc/apt/sources.list*, Acquire::http::Proxy)")
    h.run(cmd(APT_INSTALL, pkgs=missing), timeout=timeout, hint=hint or None)
    return missing
