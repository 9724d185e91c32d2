"""The host layer over real SSH to the lab's hosts: host keys, errors, dry-run, files, become (sudo)."""
import json
import socket
import subprocess
import time

import pytest

from runbook_lib import errors
from runbook_lib.host import SSHHost, cmd
from runbook_lib.steps import step

pytestmark = pytest.mark.lab
CEPH1, REG1 = "198.18.0.2", "198.18.0.3"


def host(lab, addr=CEPH1, **kw):
    kw.setdefault("user", lab.SSH_USER)
    kw.setdefault("become", True)
    kw.setdefault("key_filename", str(lab.SSH_KEY))
    kw.setdefault("known_hosts", str(lab.KNOWN_HOSTS))
    return SSHHost(addr, **kw)


def test_runs_commands_on_its_own_host_over_one_connection(lab):
    h = host(lab)
    assert h.run(cmd("hostname"), read=True).stdout.strip() == "ceph1"
    transport = h.connection.transport
    assert h.run(cmd("echo {x}", x="a b;c"), read=True).stdout == "a b;c\n"
    assert h.connection.transport is transport  # reused, not one connection per command
    assert transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert host(lab, REG1).run(cmd("hostname"), read=True).stdout.strip() == "registry1"


def test_unknown_host_key_is_refused(lab, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(errors.HostKeyError) as ei:
        host(lab, known_hosts=str(empty)).run(cmd("true"), read=True)
    e = ei.value
    assert e.kind == "unknown" and e.host == CEPH1 and str(empty) in str(e) and "ssh-keyscan" in str(e)


def test_changed_host_key_is_refused(lab, tmp_path):
    # registry1's real key filed under ceph1's address: what a changed key looks like.
    lines = open(lab.KNOWN_HOSTS).read().splitlines()
    reg_key = next(l.split(None, 1)[1] for l in lines if l.startswith(REG1 + " "))
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{CEPH1} {reg_key}\n")
    with pytest.raises(errors.HostKeyError) as ei:
        host(lab, known_hosts=str(kh)).run(cmd("true"), read=True)
    assert ei.value.kind == "changed" and "ssh-keygen" in str(ei.value) and str(kh) in str(ei.value)


def test_missing_known_hosts_file_is_refused_not_trusted(lab, tmp_path):
    with pytest.raises(errors.HostKeyError):
        host(lab, known_hosts=str(tmp_path / "nope")).run(cmd("true"), read=True)


def test_wrong_key_is_an_auth_error(lab, tmp_path):
    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with pytest.raises(errors.HostAuthError) as ei:
        host(lab, key_filename=str(key)).run(cmd("true"), read=True)
    assert ei.value.host == CEPH1 and "ssh_key" in str(ei.value)


def test_unreachable_host_is_a_clear_error(lab):
    with pytest.raises(errors.HostUnreachable) as ei:
        host(lab, "198.18.0.250", connect_timeout=2).run(cmd("true"), read=True)
    assert "198.18.0.250:22" in str(ei.value)


def test_failed_command_carries_exit_code_and_stderr(lab):
    with pytest.raises(errors.CommandFailed) as ei:
        host(lab).run(cmd("ls {p}", p="/no/such/path"))
    assert ei.value.exit_code != 0 and "No such file" in ei.value.stderr and ei.value.host == CEPH1


def test_dry_run_touch_leaves_no_file(lab):
    path = "/tmp/runbook-dry-run-proof"
    real = host(lab)
    real.run(cmd("rm -f {p}", p=path))
    dry = host(lab, dry_run=True)

    @step("touch in dry-run")
    def touch():
        dry.run(cmd("touch {p}", p=path))
        dry.put_file(path + ".conf", "x=1\n")

    rep = touch()
    assert rep.status == "would change" and all(r.skipped for r in rep.results if not r.read)
    assert not real.exists(path) and not real.exists(path + ".conf")


def test_put_file_over_ssh_is_idempotent_and_keeps_mode(lab):
    h = host(lab, REG1)
    p = "/tmp/runbook-put/secret.conf"
    h.run(cmd("rm -rf /tmp/runbook-put"))
    content = "line with 'quotes' and $(dollars)\n" * 50
    assert h.put_file(p, content, mode=0o600, secret=True).changed
    assert h.read_file(p) == content.encode()
    assert h.run(cmd("stat -c %a {p}", p=p), read=True).stdout.strip() == "600"
    assert not h.put_file(p, content, mode=0o600, secret=True).changed


def test_stdin_reaches_the_command_without_a_command_line(lab):
    h = host(lab)
    r = h.run(cmd("cat"), stdin="from-stdin-" * 100, read=True)
    assert r.stdout == "from-stdin-" * 100


# ---------------------------------------------------------------- become (sudo -n in the host layer)

HOSTILE = ["a b", "it's", 'say "hi"', "x; id", "$(id -u)", "`id`", "*"]


def test_become_runs_commands_and_file_writes_as_root_through_sudo(lab, tmp_path, monkeypatch):
    from runbook_lib import host as host_mod
    jpath = tmp_path / "journal.jsonl"
    monkeypatch.setenv("RUNBOOK_JOURNAL", str(jpath))
    monkeypatch.setattr(host_mod, "_become_known", {})  # earlier tests' checks of this login: forgotten
    plain, root = host(lab, become=False), host(lab)
    assert plain.run(cmd("id -un"), read=True).stdout.strip() == lab.SSH_USER
    p = "/etc/runbook-become-proof/secret.conf"
    assert plain.run(cmd("mkdir -p /etc/runbook-become-proof"), check=False).exit_code != 0  # k8s may not
    n_plain = len(jpath.read_text().splitlines())
    assert root.run(cmd("id -un"), read=True).stdout.strip() == "root"
    assert root.check_become() == "sudo" and root.uses_sudo
    for v in HOSTILE:  # the quoting survives the extra shell sudo runs
        assert root.run(cmd("printf %s {v}", v=v), read=True).stdout == v
    root.run(cmd("rm -rf /etc/runbook-become-proof"))
    assert root.put_file(p, "k=v\n", mode=0o600, secret=True).changed
    assert root.run(cmd("stat -c %U:%a {p}", p=p), read=True).stdout.strip() == "root:600"
    assert root.read_file(p) == b"k=v\n"
    assert not root.put_file(p, "k=v\n", mode=0o600, secret=True).changed
    again = host(lab)  # the next section's host object, same login: sudo is known, not asked again
    assert again.run(cmd("id -un"), read=True).stdout.strip() == "root" and again.uses_sudo
    assert plain.read_file(p) is None  # really root-only
    root.run(cmd("rm -rf /etc/runbook-become-proof"))
    entries = [json.loads(l) for l in jpath.read_text().splitlines()]
    assert not any(e["become"] for e in entries[:n_plain])
    checks = [e for e in entries if e["command"].startswith("become check as k8s")]
    assert len(checks) == 1 and checks[0]["exit_code"] == 0  # once per login, recorded
    mine = [e for e in entries[n_plain:-2] + entries[-1:] if e not in checks]  # all but plain's read_file
    assert len(mine) > 10 and all(e["become"] for e in mine), [e for e in mine if not e["become"]]
    assert all("sudo" not in e["command"] for e in entries if e not in checks)  # the command, not the wrapper


def test_stdin_secret_through_sudo_stays_off_the_command_line(lab):
    """A secret given on stdin to a command run through sudo never shows in the host's process list."""
    secret = "stdin-only-" + "x" * 20
    h, watcher = host(lab), host(lab, become=False)
    import threading
    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(watcher.run(cmd("ps -eo args"), read=True).stdout)
    t = threading.Thread(target=watch)
    t.start()
    try:
        r = h.run(cmd("sleep 1; cat"), stdin=secret, read=True, no_log=True)
    finally:
        done.set()
        t.join()
    assert r.stdout == secret
    assert len(seen) >= 2 and any("sleep 1" in s for s in seen)  # the watcher saw the command run
    assert not any(secret in s for s in seen)


def test_root_login_is_refused_on_every_lab_host(lab):
    for name, addr in lab.HOSTS.items():
        with pytest.raises(errors.HostAuthError):
            host(lab, addr, user="root", become=False).run(cmd("true"), read=True)
        r = subprocess.run(lab.ssh_argv(addr, "true", user="root"), capture_output=True, text=True, timeout=30)
        assert r.returncode == 255 and "Permission denied" in r.stderr, (name, r.stderr)


def test_sudo_that_wants_a_password_is_a_clear_error_and_changes_nothing(lab):
    name, addr = "labtest-sudopw", "198.18.0.40"
    lab.add_host(name, addr, sudo="password")
    try:
        h = host(lab, addr)
        t0 = time.monotonic()
        with pytest.raises(errors.HostAuthError) as ei:
            h.run(cmd("touch /etc/runbook-must-not-exist"))
        assert time.monotonic() - t0 < 20  # refused at once, never a hang on a prompt
        e = ei.value
        assert e.host == addr and "password" in str(e) and "NOPASSWD" in e.hint and "become: false" in e.hint
        assert host(lab, addr, become=False).run(cmd("test -e /etc/runbook-must-not-exist"), read=True,
                                                 check=False).exit_code == 1
        assert lab.host_exec(name, ["test", "-e", "/etc/runbook-must-not-exist"], check=False).returncode == 1
    finally:
        lab.remove_host(name)


def test_become_with_a_root_login_needs_no_sudo(lab):
    """become: true with ssh_user root (hosts of the old kind): commands run as they are."""
    name, addr = "labtest-rootlogin", "198.18.0.41"
    lab.add_host(name, addr, systemd=False)
    try:
        h = host(lab, addr, user="root")
        assert h.run(cmd("id -u"), read=True).stdout.strip() == "0"
        assert h.check_become() == "root" and not h.uses_sudo
        assert host(lab, addr, user="root", become=False).run(cmd("id -u"), read=True).stdout.strip() == "0"
    finally:
        lab.remove_host(name)
