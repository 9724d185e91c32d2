"""The host layer: the one choke point every command on every host goes through.

One backend class per transport (as pytest-testinfra): `SSHHost` over fabric,
`LocalHost` for the control node.  Commands are `Command` objects built by
`cmd()` from a template with shlex-quoted arguments; a plain str is refused.
Every call is timed, masked, journaled, and skipped in dry-run unless it is a
read (reads are needed to decide, and are marked as such).

Privilege comes from `become` (as Ansible's), here and nowhere else: a host made with
become=True runs every command and every file write as root through `sudo -n` (never a
prompt, never a hang), after one check per host that sudo works without a password.
A login that is already root needs no sudo.  Modules never write `sudo` themselves.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import shlex
import socket
import subprocess
import threading
import time

from .errors import CommandFailed, HostAuthError, HostKeyError, HostUnreachable
from .journal import Result, record
from .masking import mask


class Command(str):
    """A shell command line whose arguments were quoted by `cmd()`."""


def quote(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(shlex.quote(str(v)) for v in value)
    return shlex.quote(str(value))


def cmd(template: str, **args) -> Command:
    """Build a command: every {name} in template is replaced by its quoted value.

    >>> cmd("ls -l {path}", path="a b; rm -rf /")
    "ls -l 'a b; rm -rf /'"
    Lists become several quoted words.  Literal braces: {{ }}.
    """
    return Command(template.format(**{k: quote(v) for k, v in args.items()}))


def argv(*words) -> Command:
    return Command(quote(list(words)))


SYSTEMD_TEST = Command("test -d /run/systemd/system")  # systemd is PID 1 (sd_booted's test)
BECOME_CHECK = Command('if [ "$(id -u)" = 0 ]; then echo root; else sudo -n true 2>&1 && echo sudo; fi')


def become_wrap(command: str) -> str:
    """`command` run as root through sudo: no prompt (-n), root's HOME (-H), one shell word."""
    return "sudo -n -H -- /bin/sh -c " + shlex.quote(command)


def become_problem(output: str, user: str) -> tuple[str, str] | None:
    """(message, hint) when BECOME_CHECK's output says sudo cannot be used, else None."""
    last = output.strip().splitlines()[-1] if output.strip() else ""
    if last in ("root", "sudo"):
        return None
    fix_rule = f"{user} ALL=(ALL) NOPASSWD: ALL"
    if "password is required" in output or "a terminal is required" in output:
        return (f"become: sudo wants a password for {user} (the runbook never types one)",
                f"give {user} passwordless sudo (e.g. '{fix_rule}' in /etc/sudoers.d/{user}, mode 0440), "
                "or log in as root with ssh_user: root and become: false")
    if "not found" in output:
        return (f"become: sudo is not installed (logged in as {user})",
                "install it (apt-get install sudo / dnf install sudo) and allow passwordless sudo, "
                "or log in as root with ssh_user: root and become: false")
    if "not in the sudoers" in output or "not allowed" in output or "may not run sudo" in output:
        return (f"become: {user} may not use sudo ({last[:200]})",
                f"add '{fix_rule}' to /etc/sudoers.d/{user} (mode 0440), or log in as root")
    return (f"become: sudo -n true failed for {user}: {output.strip()[-300:]}",
            "check sudo on that host (sudo -n true must succeed as the SSH user)")


# What `systemctl is-enabled` / `is-active` exit 0 for (systemctl(1)), so that one `systemctl show`
# answers what those two commands would.
ENABLED_STATES = frozenset({"enabled", "enabled-runtime", "static", "alias", "indirect", "generated", "transient"})
ACTIVE_STATES = frozenset({"active", "reloading", "refreshing"})
UNIT_PROPS = "UnitFileState,ActiveState,MainPID"


def parse_unit_states(text: str, units) -> dict:
    """`systemctl show -p UnitFileState,ActiveState,MainPID U1 U2...` (one block per unit, in order,
    blank-line separated; properties in systemd's order) -> {unit: {"enabled", "active", "pid"}}.
    A unit whose block is missing counts as disabled, inactive, pid 0."""
    blocks = [dict(line.partition("=")[::2] for line in b.splitlines() if "=" in line)
              for b in text.strip().split("\n\n")] if text.strip() else []
    out = {}
    for i, u in enumerate(units):
        b = blocks[i] if i < len(blocks) else {}
        pid = b.get("MainPID", "").strip()
        out[u] = {"enabled": b.get("UnitFileState", "").strip() in ENABLED_STATES,
                  "active": b.get("ActiveState", "").strip() in ACTIVE_STATES,
                  "pid": int(pid) if pid.isdigit() else 0}
    return out


def parse_hash_modes(text: str, n: int) -> list[tuple[str, str]]:
    """put_files' probe (a line "SHA256 MODE" per file, "-" for a missing one) -> n (sha, mode)
    pairs, "" for what is unknown (then the file is written)."""
    out = []
    lines = text.splitlines()
    for i in range(n):
        parts = lines[i].split() if i < len(lines) else []
        sha = parts[0] if parts and parts[0] != "-" else ""
        mode = parts[1] if len(parts) > 1 and parts[1] != "-" else ""
        out.append((sha, mode))
    return out


class Host:
    """Common logic; subclasses implement _exec (and may override _write, _read_bytes)."""

    kind = "abstract"
    user = "root"

    def __init__(self, name: str, *, dry_run: bool = False, become: bool = False):
        self.name = name
        self.dry_run = dry_run
        self.become = become
        self._sudo: bool | None = None   # None: not checked yet on this connection
        self._facts: dict = {}

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"

    # -- commands ---------------------------------------------------------
    def run(self, command: Command | list | tuple, *, changed: bool | None = None, read: bool = False,
            check: bool = True, no_log: bool = False, stdin: str | bytes | None = None,
            timeout: float | None = None, hint: str | None = None, ok_codes=(0,)) -> Result:
        """Run a command.  changed: what the caller says the command did when it
        succeeds (default: True unless read).  read=True runs even in dry-run.
        check: raise CommandFailed on an exit code not in ok_codes."""
        if isinstance(command, (list, tuple)):
            command = argv(*command)
        if not isinstance(command, Command):
            raise TypeError("Host.run takes a Command from cmd()/argv() (quoted arguments), not a plain str")
        if changed is None:
            changed = not read
        if self.dry_run and not read:
            return record(Result(self.name, command, exit_code=None, skipped=True, changed=changed,
                                 no_log=no_log, become=self.become))
        t0 = time.monotonic()
        rc, out, err = self._sh(str(command), stdin=stdin, timeout=timeout)
        res = Result(self.name, command, rc, out, err, time.monotonic() - t0,
                     changed=bool(changed and rc in ok_codes), read=read, no_log=no_log, become=self.uses_sudo)
        record(res)
        if check and rc not in ok_codes:
            raise CommandFailed(self.name, command, rc, "" if no_log else out, "" if no_log else err, hint=hint)
        return res

    def test(self, command: Command) -> bool:
        """A read whose exit code is the answer."""
        return self.run(command, read=True, check=False).exit_code == 0

    # -- files --------------------------------------------------------------
    def read_file(self, path: str) -> bytes | None:
        """Contents of a file, or None when it does not exist (a read)."""
        t0 = time.monotonic()
        data = self._read_bytes(path)
        record(Result(self.name, f"read {path}", 0 if data is not None else 1, duration=time.monotonic() - t0,
                      read=True, kind="file", no_log=True, become=self.uses_sudo))
        return data

    def put_file(self, path: str, content: str | bytes, *, mode: int = 0o644, secret: bool = False,
                 mkdir: bool = True, _have: tuple[str, str] | None = None) -> Result:
        """Write a file only if its content or mode differs (idempotent: changed/ok).

        secret: the content is a secret (key, htpasswd, config with passwords):
        it is never recorded, and the file is created with its mode from the start.
        _have: (sha256, octal mode) already read by put_files.
        """
        if isinstance(content, str):
            content = content.encode()
        want = hashlib.sha256(content).hexdigest()
        if _have is None:
            probe = self.run(cmd("sha256sum {p} 2>/dev/null; stat -c %a {p} 2>/dev/null; true", p=path), read=True)
            lines = probe.stdout.split()
            _have = (lines[0] if lines else "", lines[2] if len(lines) >= 3 else "")
        same_content = _have[0] == want
        same_mode = _have[1] == format(mode, "o")
        what = f"write {path} (mode {mode:o}, {len(content)} bytes, sha256 {want[:12]})"
        if same_content and same_mode:
            return record(Result(self.name, what, 0, kind="file", read=True, changed=False, become=self.uses_sudo))
        if self.dry_run:
            return record(Result(self.name, what, None, skipped=True, changed=True, kind="file", no_log=secret,
                                 become=self.become))
        t0 = time.monotonic()
        if mkdir:
            self._sh(str(cmd("mkdir -p {d}", d=os.path.dirname(path) or ".")))
        if same_content:
            self._sh(str(cmd("chmod {m} {p}", m=format(mode, "o"), p=path)))
        else:
            self._write(path, content, mode)
        return record(Result(self.name, what, 0, duration=time.monotonic() - t0, kind="file", changed=True,
                             no_log=secret, become=self.uses_sudo))

    def put_files(self, files) -> list[Result]:
        """put_file for several files [(path, content, mode, secret)], with ONE read of all their
        hashes and modes (a command per file otherwise); each write is recorded as put_file's."""
        files = list(files)
        if not files:
            return []
        probe = self.run(cmd("for p in {ps}; do h=$(sha256sum \"$p\" 2>/dev/null) || h=-; m=$(stat -c %a \"$p\" "
                             "2>/dev/null) || m=-; echo \"${{h%% *}} $m\"; done", ps=[f[0] for f in files]), read=True)
        have = parse_hash_modes(probe.stdout, len(files))
        return [self.put_file(p, c, mode=m, secret=sec, _have=hv) for (p, c, m, sec), hv in zip(files, have)]

    def exists(self, path: str) -> bool:
        return self.test(cmd("test -e {p}", p=path))

    # -- facts ---------------------------------------------------------------
    def has_systemd(self) -> bool:
        """systemd as PID 1 (real hosts usually; the lab's namespaces never)."""
        if "systemd" not in self._facts:
            self._facts["systemd"] = self.test(SYSTEMD_TEST)
        return self._facts["systemd"]

    def learned_systemd(self, answer: bool) -> None:
        """A combined probe ran SYSTEMD_TEST already: has_systemd() takes its answer (no command)."""
        self._facts.setdefault("systemd", bool(answer))

    def unit_states(self, *units: str) -> dict:
        """{unit: {"enabled", "active", "pid"}} for systemd units, in one read (instead of
        is-enabled, is-active and show -p MainPID per unit).  Call only where has_systemd()."""
        r = self.run(cmd("systemctl show -p {props} {units}", props=UNIT_PROPS, units=list(units)),
                     read=True, check=False)
        return parse_unit_states(r.stdout if r.exit_code == 0 else "", units)

    def close(self):
        pass

    # -- become -----------------------------------------------------------------
    @property
    def uses_sudo(self) -> bool:
        """Commands go through sudo: become is on and the login is not root (after the check)."""
        return bool(self.become and self._sudo)

    def check_become(self) -> str:
        """With become, make sure sudo works without a password (once per host object; a read).
        Raises HostAuthError naming the host and the fix.  Returns how privilege is had:
        "root" (the login is root), "sudo", or "none" (become off)."""
        if not self.become:
            return "none"
        if self._sudo is None:
            self._sudo = _become_known.get(self._become_key())
        if self._sudo is None:
            t0 = time.monotonic()
            rc, out, err = self._exec(str(BECOME_CHECK), timeout=30)
            problem = become_problem(out + err, self.user)
            record(Result(self.name, f"become check as {self.user}: {BECOME_CHECK}", 1 if problem else 0,
                          out, err, time.monotonic() - t0, read=True))
            if problem:
                raise HostAuthError(self.name, *problem)
            self._sudo = out.strip().splitlines()[-1] == "sudo"
            if self._become_key() is not None:
                _become_known[self._become_key()] = self._sudo
        return "sudo" if self._sudo else "root"

    def _become_key(self):
        """The login a become check holds for (SSH: address, user, port, key, known_hosts)."""
        return None

    def _sh(self, command: str, stdin=None, timeout=None) -> tuple[int, str, str]:
        """The one way a command reaches the transport: through sudo when become says so."""
        if self.become and self._sudo is None:
            self.check_become()
        return self._exec(become_wrap(command) if self.uses_sudo else command, stdin=stdin, timeout=timeout)

    # -- transport -------------------------------------------------------------
    def _exec(self, command: str, stdin=None, timeout=None) -> tuple[int, str, str]:
        raise NotImplementedError

    def _write(self, path: str, content: bytes, mode: int) -> None:
        # Through the shell so that the file is created with its final mode
        # (umask 077 first) and replaced atomically (mv).
        tmp = f"{path}.runbook-tmp"
        c = cmd("umask 077 && cat > {t} && chmod {m} {t} && mv -f {t} {p}", t=tmp, m=format(mode, "o"), p=path)
        rc, out, err = self._sh(str(c), stdin=content)
        if rc != 0:
            raise CommandFailed(self.name, f"write {path}", rc, "", err)

    def _read_bytes(self, path: str) -> bytes | None:
        rc, out, err = self._sh(str(cmd("test -f {p} && base64 -w0 {p}", p=path)))
        if rc != 0:
            return None
        import base64
        return base64.b64decode(out)


class LocalHost(Host):
    """The control node: commands run here through the same layer."""

    kind = "local"

    def __init__(self, name: str = "local", **kw):
        super().__init__(name, **kw)
        import getpass
        self.user = getpass.getuser()

    def _exec(self, command, stdin=None, timeout=None):
        if isinstance(stdin, str):
            stdin = stdin.encode()
        try:
            p = subprocess.run(["/bin/sh", "-c", command], input=stdin if stdin is not None else b"",
                               capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return 124, "", f"timed out after {timeout}s"
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


DEFAULT_KNOWN_HOSTS = os.path.expanduser("~/.ssh/known_hosts")


class _WholeRead(io.StringIO):
    """invoke reads a non-tty stdin 1 byte per 10 ms (900 bytes: 9 s): hand it all at once."""

    def read(self, size=-1):
        return super().read()


class SSHHost(Host):
    """A remote host over fabric: one connection reused, TCP_NODELAY, host key verified."""

    kind = "ssh"

    def __init__(self, address: str, *, user: str = "root", port: int = 22, key_filename: str | None = None,
                 known_hosts: str | None = None, connect_timeout: float = 10, name: str | None = None,
                 dry_run: bool = False, become: bool = False):
        super().__init__(name or address, dry_run=dry_run, become=become)
        self.address, self.user, self.port = address, user, int(port)
        self.key_filename = key_filename
        self.known_hosts = known_hosts or DEFAULT_KNOWN_HOSTS
        self.connect_timeout = connect_timeout
        self._conn = None
        self._lock = threading.Lock()

    @property
    def connection(self):
        with self._lock:
            if self._conn is None or not self._conn.is_connected:
                self._conn = _pooled(self._login(), self._connect)
            return self._conn

    def _login(self) -> tuple:
        return (self.address, self.user, self.port, self.key_filename, self.known_hosts)

    _become_key = _login

    def _lost(self) -> None:
        """The connection died: neither this object nor the pool reuses it."""
        _unpool(self._login(), self._conn)
        self._conn = None

    def _connect(self):
        import fabric
        import paramiko

        ck = {"allow_agent": False}
        if self.key_filename:
            ck.update(key_filename=self.key_filename, look_for_keys=False)
        c = fabric.Connection(self.address, user=self.user, port=self.port, connect_timeout=self.connect_timeout,
                              connect_kwargs=ck)
        c.config.runners.remote = _quick_remote()
        # fabric accepts any host key by default: load known_hosts, reject unknowns.
        if not os.path.exists(self.known_hosts):
            raise HostKeyError(self.name, self.known_hosts, "unknown")
        c.client.load_host_keys(self.known_hosts)
        c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            c.open()
        except paramiko.BadHostKeyException:
            raise HostKeyError(self.name, self.known_hosts, "changed") from None
        except paramiko.AuthenticationException as e:
            if "transport shut down" in str(e) or "saw EOF" in str(e):  # the connection dropped, not a bad key
                raise HostUnreachable(self.name, f"SSH connection lost during login on port {self.port}: {e}",
                                      "check that sshd runs on the host, then run again") from None
            raise HostAuthError(self.name, f"SSH authentication failed as {self.user}: {e}",
                                "check ssh_user and ssh_key, and that the key is in the host's authorized_keys") from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise HostKeyError(self.name, self.known_hosts, "unknown") from None
            raise HostUnreachable(self.name, f"SSH failed on port {self.port}: {e}") from None
        except (OSError, socket.timeout) as e:
            raise HostUnreachable(self.name, f"cannot reach {self.address}:{self.port} ({e})",
                                  "check the address, that sshd runs there, and the network path") from None
        # Nagle off: ~45 ms -> ~18 ms per command on one connection.
        c.transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c

    def _exec(self, command, stdin=None, timeout=None):
        from invoke.exceptions import CommandTimedOut

        conn = self.connection
        if isinstance(stdin, bytes):
            stdin = stdin.decode()
        in_stream = _WholeRead(stdin) if stdin is not None else False
        try:
            r = conn.run(command, hide=True, warn=True, in_stream=in_stream, timeout=timeout, pty=False)
        except CommandTimedOut:
            return 124, "", f"timed out after {timeout}s"
        except (EOFError, OSError, socket.error) as e:
            self._lost()
            raise HostUnreachable(self.name, f"connection lost while running a command: {e}") from None
        except Exception as e:  # paramiko raises SSHException on a dead transport
            import paramiko
            if isinstance(e, paramiko.SSHException):
                self._lost()
                raise HostUnreachable(self.name, f"connection lost while running a command: {e}") from None
            raise
        if r.exited == -1:  # paramiko: the channel closed without an exit status (sshd session gone)
            self._lost()
            raise HostUnreachable(self.name, "connection lost while running a command (no exit status): "
                                  f"{command[:200]}", "check that sshd runs on the host, then run again")
        return r.exited, r.stdout, r.stderr

    def close(self):
        if self._conn is not None:
            _unpool(self._login(), self._conn)
            self._conn.close()
            self._conn = None


@functools.lru_cache(maxsize=None)  # one class (fabric is imported on the first login only)
def _quick_remote():
    """fabric's Remote runner polling every 1 ms instead of invoke's 10 ms (Runner.input_sleep, its
    loop until a command has ended and its output is read): 12 -> 8 ms a command here."""
    import fabric.runners

    class QuickRemote(fabric.runners.Remote):
        input_sleep = 0.001
    return QuickRemote


# Live SSH connections by login (address, user, port, key, known_hosts), shared by the host objects of
# one process: the sections of a deploy run in one kernel, and section 2 reuses the login section 1
# made (a login is ~0.15 s here, a command ~12 ms).  Each host object still checks become once.
_pool: dict[tuple, object] = {}
_pool_lock = threading.Lock()
# What a login's become check found (sudo or root), so that the next host object of the same login
# does not ask again (one check per login and process, ~12 ms each; a lost connection forgets it).
_become_known: dict[tuple, bool] = {}


def _pooled(login: tuple, make):
    with _pool_lock:
        c = _pool.get(login)
        if c is not None and c.is_connected:
            return c
    _become_known.pop(login, None)  # a new login (the host may have been rebuilt): sudo is asked again
    c = make()  # outside the lock: logins to several hosts go on in parallel
    with _pool_lock:
        _pool[login] = c
    return c


def _unpool(login: tuple, conn) -> None:
    _become_known.pop(login, None)
    with _pool_lock:
        if conn is not None and _pool.get(login) is conn:
            del _pool[login]


def connect(address: str, params: dict, *, dry_run: bool = False, connect_timeout: float = 10) -> Host:
    """The host object for an address and a section's parameters (ssh_user, ssh_port, ssh_key,
    known_hosts, become): "local" is the control node."""
    become = bool(params.get("become", False))
    if address == "local":
        return LocalHost(dry_run=dry_run, become=become and os.geteuid() != 0)
    key = os.path.expanduser(params.get("ssh_key") or "") or None
    kh = os.path.expanduser(params.get("known_hosts") or DEFAULT_KNOWN_HOSTS)
    return SSHHost(address, user=params.get("ssh_user") or "root", port=params.get("ssh_port") or 22,
                   key_filename=key, known_hosts=kh, dry_run=dry_run, become=become,
                   connect_timeout=connect_timeout)
