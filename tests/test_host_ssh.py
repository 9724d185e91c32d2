"""The host layer over real SSH to the lab's hosts: host keys, errors, dry-run, files."""
import socket
import subprocess

import pytest

from runbook_lib import errors
from runbook_lib.host import SSHHost, cmd
from runbook_lib.steps import step

pytestmark = pytest.mark.lab
CEPH1, REG1 = "198.18.0.2", "198.18.0.3"


def host(lab, addr=CEPH1, **kw):
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
