"""Section 1 (01-rgw): unit tests of the pure parts, then the notebook on the real lab.

The lab tests leave RGW deployed on ceph1 (later sections use it)."""
from __future__ import annotations

import json
import re

import pytest

from runbook_lib import rgw
from runbook_lib.host import cmd

from helpers import lab_host  # noqa: E402
from conftest import outputs_text

CEPH1, REGISTRY1 = "198.18.0.2", "198.18.0.3"


# -- unit ------------------------------------------------------------------------------

def test_daemon_id_defaults_to_rgw_dot_short_hostname():
    assert rgw.daemon_id("", "ceph1.example.org") == "rgw.ceph1"
    assert rgw.daemon_id("gw1", "ceph1") == "rgw.gw1"
    assert rgw.daemon_id("rgw.gw1", "ceph1") == "rgw.gw1"


def test_paths_follow_ceph_deploy_layout():
    p = rgw.paths("rgw.ceph1")
    assert p["entity"] == "client.rgw.ceph1"
    assert p["keyring"] == "/var/lib/ceph/radosgw/ceph-rgw.ceph1/keyring"
    assert p["unit"] == "ceph-radosgw@rgw.ceph1"


def test_render_ceph_deploy_as_in_the_document():
    assert rgw.deploy_commands("ceph-deploy", "172.27.132.66", "rgw.172") == ["ceph-deploy rgw create 172.27.132.66"]
    assert rgw.deploy_commands("ceph-deploy", "node1", "rgw.node1") == ["ceph-deploy rgw create node1"]
    assert rgw.deploy_commands("ceph-deploy", "node1", "rgw.gw1") == ["ceph-deploy rgw create node1:gw1"]


def test_render_ceph_deploy_other_port_sets_the_frontend_first():
    c = rgw.deploy_commands("ceph-deploy", "node1", "rgw.node1", 8080)
    assert c == ["ceph config set client.rgw.node1 rgw_frontends 'beast port=8080'",
                 "ceph-deploy rgw create node1"]


def test_render_cephadm():
    assert rgw.deploy_commands("cephadm", "ceph1", "rgw.ceph1", 7480) == [
        "ceph orch apply rgw ceph1 --placement=ceph1 --port=7480"]
    # names are quoted: nothing a parameter holds reaches the shell unquoted
    assert rgw.deploy_commands("cephadm", "h;x", "rgw.a b", 80) == [
        "ceph orch apply rgw 'a b' --placement='h;x' --port=80"]
    with pytest.raises(ValueError):
        rgw.deploy_commands("packages", "h", "rgw.h")


def test_frontend_endpoint_for_ip_port_for_names():
    assert rgw.frontend("198.18.0.2", 7480) == "beast endpoint=198.18.0.2:7480 tcp_nodelay=1"
    assert rgw.frontend("::1", 7480) == "beast endpoint=[::1]:7480 tcp_nodelay=1"
    assert rgw.frontend("ceph1", 7480) == "beast port=7480 tcp_nodelay=1"


def test_frontend_without_nodelay_is_the_documents_line():
    assert rgw.frontend("198.18.0.2", 7480, nodelay=False) == "beast endpoint=198.18.0.2:7480"
    assert rgw.conf_entries("rgw.a", "ceph1", 80, False)["rgw frontends"] == "beast port=80"


CONF = """[global]
fsid = x
mon host = 1.2.3.4

[client.rgw.old]
rgw_frontends = beast port=1
"""


def test_conf_section_added_replaced_and_matched():
    entries = rgw.conf_entries("rgw.ceph1", "198.18.0.2", 7480)
    assert not rgw.conf_matches(CONF, "client.rgw.ceph1", entries)
    new = rgw.set_conf_section(CONF, "client.rgw.ceph1", entries)
    assert new.startswith(CONF.rstrip("\n"))  # the rest kept as it is
    assert "[client.rgw.ceph1]\nrgw frontends = beast endpoint=198.18.0.2:7480 tcp_nodelay=1\n" in new
    assert rgw.conf_matches(new, "client.rgw.ceph1", entries)
    assert rgw.set_conf_section(new, "client.rgw.ceph1", entries) == new  # idempotent
    changed = rgw.set_conf_section(new, "client.rgw.ceph1", rgw.conf_entries("rgw.ceph1", "198.18.0.2", 8080))
    assert changed.count("[client.rgw.ceph1]") == 1 and "198.18.0.2:8080" in changed and ":7480" not in changed
    assert "[client.rgw.old]" in changed


def test_conf_keys_match_with_underscores_or_spaces():
    text = "[client.rgw.a]\nrgw_frontends = beast port=7480\nkeyring=/k\nlog_file = /l\n"
    assert rgw.conf_section(text, "client.rgw.a") == {"rgw frontends": "beast port=7480", "keyring": "/k",
                                                     "log file": "/l"}
    assert rgw.conf_matches(text, "client.rgw.a", {"rgw frontends": "beast port=7480", "keyring": "/k"})
    assert rgw.conf_section(text, "client.rgw.b") is None


def test_parse_listeners():
    out = ('LISTEN 0 128 198.18.0.2:22 0.0.0.0:* users:(("sshd",pid=8805,fd=3))\n'
           'LISTEN 0 4096 198.18.0.2:7480 0.0.0.0:* users:(("radosgw",pid=1,fd=5),("radosgw",pid=1,fd=6))\n'
           'LISTEN 0 128 0.0.0.0:2024 0.0.0.0:*\n')
    assert rgw.parse_listeners(out) == [
        {"local": "198.18.0.2:22", "procs": ["sshd"]},
        {"local": "198.18.0.2:7480", "procs": ["radosgw"]},
        {"local": "0.0.0.0:2024", "procs": []},
    ]


def test_parse_auth_get_gives_key_and_caps():
    out = '[{"entity":"client.rgw.ceph1","key":"AQBkey==","caps":{"mgr":"allow rw","mon":"allow rw"}}]'
    assert rgw.parse_auth_get(out) == ("AQBkey==", {"mgr": "allow rw", "mon": "allow rw"})
    for bad in ("", "Error ENOENT: failed to find client.rgw.x in keyring", "[]", "{}"):
        assert rgw.parse_auth_get(bad) == (None, {})


def test_keyring_key_reads_the_key_line():
    text = '[client.rgw.ceph1]\n\tkey = AQBkey/+==\n\tcaps mon = "allow rw"\n'
    assert rgw.keyring_key(text) == "AQBkey/+=="
    assert rgw.keyring_key("") is None and rgw.keyring_key("[client.x]\n") is None


def test_endpoint():
    class C:
        params = {"rgw_host": "198.18.0.2", "rgw_port": 7480}
    assert rgw.endpoint(C) == "http://198.18.0.2:7480"


# -- lab ---------------------------------------------------------------------------------

def ssh_host(lab, addr):
    return lab_host(addr)


def rgw_pid(h, did="rgw.ceph1") -> str:
    """The running radosgw's pid, as its unit knows it."""
    return h.run(cmd("systemctl show -p MainPID --value {u}", u=rgw.paths(did)["unit"]), read=True).stdout.strip()


def step_counts(nb) -> dict:
    m = re.search(r"steps: (\d+) ok, (\d+) changed, (\d+) would change, (\d+) failed", outputs_text(nb))
    assert m, "no step counts in the verdict output"
    return dict(zip(("ok", "changed", "would change", "failed"), map(int, m.groups())))


def running_frontends(h) -> str:
    """What the running radosgw loaded (its admin socket), not what ceph.conf says."""
    # the socket of the unit's main pid: a daemon killed earlier can leave its own socket file behind
    r = h.run(cmd("ceph --admin-daemon \"$(ls /var/run/ceph/ceph-client.rgw.ceph1.{p}.*.asok)\" "
                  "config get rgw_frontends", p=rgw_pid(h)), read=True)
    return json.loads(r.stdout)["rgw_frontends"]


def conf_digest(h) -> str:
    return h.run(cmd("sha256sum /etc/ceph/ceph.conf"), read=True).stdout.split()[0]


@pytest.mark.lab
def test_deploy_then_rerun_changes_nothing(lab, run_notebook):
    import requests

    nb, _, _ = run_notebook("01-rgw")
    text = outputs_text(nb)
    assert "VERDICT 01-rgw: PASS — RGW answers on 198.18.0.2:7480" in text
    s = requests.Session()
    s.trust_env = False
    r = s.get("http://198.18.0.2:7480/", timeout=5)
    assert r.status_code == 200 and "ListAllMyBucketsResult" in r.text

    nb2, path2, _ = run_notebook("01-rgw")
    c = step_counts(nb2)
    assert c["changed"] == 0 and c["would change"] == 0 and c["failed"] == 0 and c["ok"] >= 6
    text2 = outputs_text(nb2)
    assert "changed]" not in text2 and "VERDICT 01-rgw: PASS" in text2
    # the daemon's key never reaches the executed notebook
    key = ssh_host(lab, CEPH1).run(cmd("ceph auth print-key client.rgw.ceph1"), read=True, no_log=True).stdout.strip()
    assert len(key) > 20 and key not in path2.read_text()
    # RGW is a systemd unit on ceph1, enabled (it comes back after a reboot: test_faults)
    h = ssh_host(lab, CEPH1)
    assert h.run(cmd("systemctl is-active ceph-radosgw@rgw.ceph1"), read=True, check=False).stdout.strip() == "active"
    assert h.run(cmd("systemctl is-enabled ceph-radosgw@rgw.ceph1"), read=True, check=False).stdout.strip() == "enabled"
    # the daemon runs with Nagle off (bench/bench_push.py: 5x the push throughput)
    assert running_frontends(ssh_host(lab, CEPH1)) == "beast endpoint=198.18.0.2:7480 tcp_nodelay=1"


@pytest.mark.lab
def test_nodelay_off_writes_the_documents_line_and_back(lab, run_notebook):
    h = ssh_host(lab, CEPH1)
    try:
        nb, _, _ = run_notebook("01-rgw", rgw_tcp_nodelay=False)
        assert step_counts(nb)["changed"] == 2 and "VERDICT 01-rgw: PASS" in outputs_text(nb)
        assert running_frontends(h) == "beast endpoint=198.18.0.2:7480"
    finally:
        nb, _, _ = run_notebook("01-rgw")
    assert step_counts(nb)["changed"] == 2  # configure + restart, back to the default
    assert running_frontends(h) == "beast endpoint=198.18.0.2:7480 tcp_nodelay=1"


@pytest.mark.lab
def test_restarts_a_dead_daemon(lab, run_notebook):
    h = ssh_host(lab, CEPH1)
    run_notebook("01-rgw")
    pid = rgw_pid(h)
    assert pid.isdigit() and pid != "0"
    # stopped behind systemd's back (SIGTERM is a clean exit: the unit does not restart it)
    h.run(cmd("kill {p}; for i in $(seq 50); do [ -d /proc/{p} ] || exit 0; sleep 0.1; done; exit 1", p=pid))
    assert not h.test(cmd("systemctl is-active --quiet ceph-radosgw@rgw.ceph1"))
    nb, _, _ = run_notebook("01-rgw")
    assert step_counts(nb)["changed"] == 1  # only the start step
    assert "VERDICT 01-rgw: PASS" in outputs_text(nb)
    assert rgw_pid(h) not in (pid, "0")


@pytest.mark.lab
def test_existing_method_verifies_only(lab, run_notebook):
    nb, _, _ = run_notebook("01-rgw", method="existing")
    assert "VERDICT 01-rgw: PASS — RGW answers on 198.18.0.2:7480" in outputs_text(nb)
    assert step_counts(nb)["changed"] == 0


@pytest.mark.lab
@pytest.mark.parametrize("method,shown", [
    ("cephadm", "ceph orch apply rgw ceph1 --placement=ceph1 --port=7480"),
    ("ceph-deploy", "ceph-deploy rgw create 198.18.0.2"),
])
def test_tool_methods_in_dry_run_show_their_commands(lab, run_notebook, method, shown):
    nb, _, _ = run_notebook("01-rgw", method=method, dry_run=True)
    text = outputs_text(nb)
    assert shown in text
    assert "VERDICT 01-rgw: DRY-RUN" in text


@pytest.mark.lab
def test_tool_method_without_the_tool_fails_before_any_change(lab, run_notebook):
    h = ssh_host(lab, CEPH1)
    before = conf_digest(h)
    nb, _, err = run_notebook("01-rgw", expect_error=True, method="ceph-deploy")
    assert "ceph-deploy is not installed on ceph_admin_host 198.18.0.2" in outputs_text(nb)
    assert conf_digest(h) == before


@pytest.mark.lab
def test_unreachable_host_is_a_parameter_error(lab, run_notebook):
    nb, _, err = run_notebook("01-rgw", expect_error=True, rgw_host="198.18.0.250")
    text = outputs_text(nb)
    assert "ParameterError" in text
    assert "rgw_host: cannot reach 198.18.0.250:22" in text
    assert "nothing was changed" in text


@pytest.mark.lab
def test_host_without_admin_keyring_fails_before_any_change(lab, run_notebook):
    h = ssh_host(lab, REGISTRY1)
    before = h.run(cmd("ls -A /etc/ceph /var/lib/ceph; cat /etc/ceph/ceph.conf 2>/dev/null; "
                       "ps -eo comm | grep -c radosgw; true"), read=True).stdout
    nb, _, err = run_notebook("01-rgw", expect_error=True, rgw_host=REGISTRY1)
    text = outputs_text(nb)
    assert "no Ceph admin keyring on 198.18.0.3" in text
    assert "✎" not in text and "would run" not in text  # no step changed anything
    after = h.run(cmd("ls -A /etc/ceph /var/lib/ceph; cat /etc/ceph/ceph.conf 2>/dev/null; "
                      "ps -eo comm | grep -c radosgw; true"), read=True).stdout
    assert after == before


@pytest.mark.lab
def test_port_taken_by_something_else_fails_before_any_change(lab, run_notebook):
    h = ssh_host(lab, CEPH1)
    before = conf_digest(h)
    nb, _, err = run_notebook("01-rgw", expect_error=True, rgw_port=22)
    text = outputs_text(nb)
    assert "rgw_port 22 on 198.18.0.2 is already taken by sshd" in text
    assert conf_digest(h) == before
    # RGW still answers where it was
    import requests
    s = requests.Session()
    s.trust_env = False
    assert s.get("http://198.18.0.2:7480/", timeout=5).status_code == 200


@pytest.mark.lab
def test_bad_rgw_name_is_a_parameter_error(lab, run_notebook):
    nb, _, err = run_notebook("01-rgw", expect_error=True, rgw_name="bad name!")
    assert "rgw_name: 'bad name!' is not a valid RGW daemon name" in outputs_text(nb)


@pytest.mark.lab
def test_changed_config_is_rewritten_and_the_daemon_restarted(lab, run_notebook):
    h = ssh_host(lab, CEPH1)
    run_notebook("01-rgw")
    pid = rgw_pid(h)
    # someone edited our section by hand
    h.run(cmd("sed -i 's|^log file = .*ceph-client.rgw.ceph1.log$|log file = /tmp/elsewhere.log|' {c}",
              c="/etc/ceph/ceph.conf"))
    assert "/tmp/elsewhere.log" in h.read_file("/etc/ceph/ceph.conf").decode()
    nb, _, _ = run_notebook("01-rgw")
    text = outputs_text(nb)
    assert step_counts(nb)["changed"] == 2  # configure + start (restart)
    assert "restarted: its config or key changed" in text and "VERDICT 01-rgw: PASS" in text
    assert "/tmp/elsewhere.log" not in h.read_file("/etc/ceph/ceph.conf").decode()
    assert rgw_pid(h) not in (pid, "0")
    assert step_counts(run_notebook("01-rgw")[0])["changed"] == 0


@pytest.mark.lab
def test_fresh_ceph_node_gets_radosgw_from_apt_and_a_systemd_unit(lab, run_notebook):
    """A Ceph node that has never had radosgw: 01-rgw installs the package through apt (the lab's
    proxy), writes the key and the section, and enables ceph-radosgw@rgw.<short hostname>;
    a re-run changes nothing."""
    name, addr = "labtest-rgw", "198.18.0.42"
    lab.add_ceph_host(name, addr)
    try:
        h = ssh_host(lab, addr)
        assert h.run(cmd("dpkg -s radosgw"), read=True, check=False).exit_code != 0  # not there before
        nb, _, _ = run_notebook("01-rgw", rgw_host=addr)
        text = outputs_text(nb)
        assert f"VERDICT 01-rgw: PASS — RGW answers on {addr}:7480" in text
        assert "installed" in text
        assert h.run(cmd("dpkg -s radosgw"), read=True).exit_code == 0
        unit = f"ceph-radosgw@rgw.{name}"
        assert h.run(cmd("systemctl is-active {u}", u=unit), read=True, check=False).stdout.strip() == "active"
        assert h.run(cmd("systemctl is-enabled {u}", u=unit), read=True, check=False).stdout.strip() == "enabled"
        # the daemon runs as the ceph user under its unit, not as a process we started
        main = rgw_pid(h, f"rgw.{name}")
        assert h.run(cmd("ps -o user= -p {p}", p=main), read=True).stdout.strip() == "ceph"
        c = step_counts(run_notebook("01-rgw", rgw_host=addr)[0])
        assert c["changed"] == 0 and c["failed"] == 0
    finally:
        lab.remove_host(name)


@pytest.mark.lab
def test_host_without_systemd_runs_radosgw_as_a_supervised_daemon(lab, run_notebook):
    """A Ceph node of the old kind (a container: no systemd, root login): 01-rgw runs radosgw
    itself (it daemonizes; its pidfile is how 01 finds it), and a re-run restarts it when it died."""
    from runbook_lib.lab import ceph
    name, addr = "labtest-rgwold", "198.18.0.45"
    lab.add_host(name, addr, systemd=False)
    try:
        hx = lab._ceph_hx(name)
        ceph.start(hx, lambda p: lab.host_path(name, p), addr, str(lab.NETWORK), log=lambda m: None)
        ceph.wait_healthy(hx)
        p = dict(rgw_host=addr, ssh_user="root", become=False)
        nb, _, _ = run_notebook("01-rgw", **p)
        text = outputs_text(nb)
        assert f"VERDICT 01-rgw: PASS — RGW answers on {addr}:7480" in text
        assert "no (the daemon is run and supervised by the runbook)" in text
        h = lab_host(addr, ssh_user="root", become=False)
        pidfile = rgw.paths(f"rgw.{name}")["pid"]
        pid = h.run(cmd("cat {f}", f=pidfile), read=True).stdout.strip()
        assert h.test(cmd("grep -qx radosgw /proc/{p}/comm", p=pid))
        h.run(cmd("kill {p}; for i in $(seq 50); do [ -d /proc/{p} ] || exit 0; sleep 0.1; done; exit 1", p=pid))
        nb, _, _ = run_notebook("01-rgw", **p)
        assert step_counts(nb)["changed"] == 1 and "VERDICT 01-rgw: PASS" in outputs_text(nb)
        assert h.run(cmd("cat {f}", f=pidfile), read=True).stdout.strip() != pid
    finally:
        lab.remove_host(name)
