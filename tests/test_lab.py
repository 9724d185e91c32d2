"""The local lab itself, checked from the outside: real OpenSSH with strict host keys, real Ceph,
real dockerd and the locally built registry:2 image.

Uses the session `lab` fixture (conftest: `lab.up()`, idempotent) and leaves the lab UP.
The restart test (down, down, up) runs last; set RUNBOOK_LAB_NO_RESTART=1 to skip it while
other test sessions share the lab.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.lab

BASE_HOSTS = ["ceph1", "registry1"]


@pytest.fixture(scope="module", autouse=True)
def _healthy(lab):
    """Start this module from a healthy lab whatever earlier modules left (up() rebuilds it then)."""
    st = lab.up()
    assert st["ok"], st


def ssh(lab, host: str, command: str, check: bool = True, timeout: float = 60,
        opts: tuple = ()) -> subprocess.CompletedProcess:
    """The exact OpenSSH invocation a user would type (plus BatchMode so it can never prompt)."""
    argv = ["ssh", "-i", str(lab.SSH_KEY), "-o", f"UserKnownHostsFile={lab.KNOWN_HOSTS}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", *opts,
            f"root@{lab.HOSTS.get(host, host)}", command]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert cp.returncode == 0, f"{command!r} on {host}: exit {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    return cp


# ------------------------------------------------------------------ contract


def test_contract_paths_and_addresses(lab):
    assert str(lab.LAB_DIR) == "/var/lib/runbook-lab"
    assert str(lab.SSH_KEY) == "/var/lib/runbook-lab/ssh/id_ed25519"
    assert str(lab.KNOWN_HOSTS) == "/var/lib/runbook-lab/ssh/known_hosts"
    assert lab.HOSTS == {"ceph1": "198.18.0.2", "registry1": "198.18.0.3"}
    assert lab.SSH_KEY.with_suffix(".pub").exists()
    assert oct(lab.SSH_KEY.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("host", BASE_HOSTS)
def test_ssh_with_strict_host_key_prints_hostname(lab, host):
    assert ssh(lab, host, "hostname").stdout.strip() == host


@pytest.mark.parametrize("host", BASE_HOSTS)
def test_known_hosts_holds_the_real_key_under_address_and_name(lab, host):
    addr = lab.HOSTS[host]
    lines = lab.KNOWN_HOSTS.read_text().splitlines()
    by_addr = [l for l in lines if l.split()[0] == addr]
    by_name = [l for l in lines if l.split()[0] == host]
    assert len(by_addr) == 1 and len(by_name) == 1
    assert by_addr[0].split()[1:] == by_name[0].split()[1:]
    assert by_addr[0].split()[1] == "ssh-ed25519"
    scan = subprocess.run(["ssh-keyscan", "-t", "ed25519", addr], capture_output=True, text=True, timeout=20)
    served = [l.split()[1:3] for l in scan.stdout.splitlines() if l and not l.startswith("#")]
    assert served == [by_addr[0].split()[1:3]]


def test_wrong_host_key_is_refused(lab, tmp_path):
    """StrictHostKeyChecking really checks: ceph1's key filed under registry1's address fails."""
    kh = tmp_path / "known_hosts"
    ceph_key = [l for l in lab.KNOWN_HOSTS.read_text().splitlines() if l.startswith("ceph1 ")][0]
    kh.write_text(ceph_key.replace("ceph1 ", f"{lab.HOSTS['registry1']} ", 1) + "\n")
    cp = subprocess.run(["ssh", "-i", str(lab.SSH_KEY), "-o", f"UserKnownHostsFile={kh}",
                         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                         f"root@{lab.HOSTS['registry1']}", "hostname"],
                        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert cp.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in cp.stderr or "Host key verification failed" in cp.stderr


def test_sftp_subsystem_works(lab, tmp_path):
    (tmp_path / "hello.txt").write_text("hello lab\n")
    cp = subprocess.run(["sftp", "-b", "-", "-i", str(lab.SSH_KEY), "-o", f"UserKnownHostsFile={lab.KNOWN_HOSTS}",
                         "-o", "StrictHostKeyChecking=yes", f"root@{lab.HOSTS['registry1']}"],
                        input=f"put {tmp_path / 'hello.txt'} /tmp/hello-from-sftp.txt\n",
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert lab.host_exec("registry1", ["cat", "/tmp/hello-from-sftp.txt"]).stdout == "hello lab\n"
    lab.host_exec("registry1", ["rm", "-f", "/tmp/hello-from-sftp.txt"])


# ------------------------------------------------------------------ hosts are separate machines


def test_hosts_have_private_filesystems(lab):
    # ceph1's keyring exists only on ceph1: not on registry1, not on the control node
    assert lab.host_exec("ceph1", ["test", "-s", "/etc/ceph/ceph.client.admin.keyring"], check=False).returncode == 0
    assert lab.host_exec("registry1", ["test", "-e", "/etc/ceph/ceph.client.admin.keyring"],
                         check=False).returncode != 0
    assert not os.path.exists("/etc/ceph/ceph.client.admin.keyring")
    mounts = lab.host_exec("ceph1", ["cat", "/proc/self/mounts"]).stdout
    for d in ["/etc/ceph", "/etc/docker", "/var/lib/ceph", "/var/log/ceph", "/run", "/root", "/opt", "/srv",
              "/var/lib/docker", "/var/lib/containers"]:
        assert f" {d} tmpfs " in mounts, d
    # and none of it shows in the control node's mount table
    with open("/proc/self/mounts") as f:
        assert not [l for l in f if l.startswith("rbl-")]


def test_hosts_see_each_other_by_address_and_name(lab):
    r = lab.host_exec("registry1", ["bash", "-c",
                                    "for p in 3300 6789; do timeout 5 bash -c \"echo > /dev/tcp/198.18.0.2/$p\" "
                                    "|| exit 1; done; getent hosts ceph1"])
    assert r.stdout.split()[:2] == ["198.18.0.2", "ceph1"]
    assert lab.host_exec("ceph1", ["busybox", "ping", "-c", "1", "-W", "2", "198.18.0.3"]).returncode == 0
    assert lab.host_exec("ceph1", ["busybox", "ping", "-c", "1", "-W", "2", "198.18.0.1"]).returncode == 0
    assert lab.host_exec("registry1", ["ip", "-o", "-4", "addr", "show", "eth0"]).stdout.split()[3] == "198.18.0.3/24"


def test_host_exec_failure_raises_lab_error(lab):
    with pytest.raises(lab.LabError) as ei:
        lab.host_exec("ceph1", ["sh", "-c", "echo boom >&2; exit 3"])
    assert "exit 3" in str(ei.value) and "boom" in str(ei.value)
    assert ei.value.stderr == "boom" and ei.value.returncode == 3
    assert lab.host_exec("ceph1", ["sh", "-c", "exit 3"], check=False).returncode == 3
    assert lab.host_exec("ceph1", ["cat"], input="x\n").stdout == "x\n"
    with pytest.raises(lab.LabError, match="not running"):
        lab.host_exec("no-such-host", ["true"])


# ------------------------------------------------------------------ ceph1


def test_ceph_is_health_ok_over_ssh(lab):
    out = ssh(lab, "ceph1", "ceph -s").stdout
    assert "HEALTH_OK" in out, out
    assert "1 osds: 1 up" in out and "1 in" in out, out
    assert "mon: 1 daemons, quorum a" in out, out
    assert "mgr: x(active" in out, out


def test_ceph_runs_with_the_lab_settings(lab):
    conf = lab.host_exec("ceph1", ["cat", "/etc/ceph/ceph.conf"]).stdout
    for line in ["osd pool default size = 1", "osd pool default min size = 1", "mon allow pool size one = true",
                 "osd crush chooseleaf type = 0", "osd objectstore = memstore", "osd fast shutdown = false",
                 "osd pool default pg num = 8", "osd pool default pgp num = 8",
                 "osd pool default pg autoscale mode = off", "paxos propose interval = 0.1",
                 "auth cluster required = cephx", "mon host = [v2:198.18.0.2:3300,v1:198.18.0.2:6789]"]:
        assert line in conf, line
    show = lab.host_exec("ceph1", ["ceph", "config", "show", "osd.0", "osd_objectstore"]).stdout.strip()
    assert show == "memstore"
    # radosgw is installed (the lab does not deploy it: 01-rgw does)
    assert lab.host_exec("ceph1", ["test", "-x", "/usr/bin/radosgw"], check=False).returncode == 0


# ------------------------------------------------------------------ registry1 and control docker


def test_docker_on_registry1_over_ssh(lab):
    v = ssh(lab, "registry1", "docker version --format '{{.Server.Version}}'").stdout.strip()
    assert v.startswith("20.10"), v
    images = ssh(lab, "registry1", "docker images --format '{{.Repository}}:{{.Tag}}'").stdout.split()
    assert "registry:2" in images
    info = ssh(lab, "registry1", "docker info --format '{{.Driver}} {{.DockerRootDir}}'").stdout.split()
    assert info == ["vfs", "/var/lib/docker"]


def test_registry_image_binary_runs(lab):
    for cmd in ["docker run --rm --entrypoint registry registry:2 --version",
                "docker run --rm --network host registry:2 --version"]:
        out = ssh(lab, "registry1", cmd).stdout
        assert "github.com/docker/distribution" in out and "2.8" in out, (cmd, out)
    cfg = ssh(lab, "registry1", "docker image inspect registry:2 --format "
                                "'{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{json .Config.ExposedPorts}}'")
    assert cfg.stdout.split() == ['["/entrypoint.sh"]', '["/etc/docker/registry/config.yml"]', '{"5000/tcp":{}}']


def test_registry_garbage_collect_via_docker_exec(lab):
    name = f"labtest-registry-{os.getpid()}"
    ssh(lab, "registry1", f"docker rm -f {name} >/dev/null 2>&1; docker run -d --name {name} --network none registry:2")
    try:
        ssh(lab, "registry1", f"docker exec {name} mkdir -p /var/lib/registry/docker/registry/v2/repositories "
                                   f"/var/lib/registry/docker/registry/v2/blobs")
        gc = ssh(lab, "registry1", f"docker exec {name} registry garbage-collect --dry-run "
                                   f"/etc/docker/registry/config.yml", check=False)
        assert gc.returncode == 0, gc.stderr
        ps = ssh(lab, "registry1", f"docker exec {name} ps").stdout
        assert "registry serve /etc/docker/registry/config.yml" in ps
    finally:
        ssh(lab, "registry1", f"docker rm -f {name}", check=False)


def test_control_node_docker_and_skopeo(lab):
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    v = subprocess.run(["docker", "version", "--format", "{{.Client.Version}} {{.Server.Version}}"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert v.returncode == 0, v.stderr
    assert v.stdout.split()[1].startswith("20.10")
    images = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                            text=True, timeout=30, env=env).stdout.split()
    assert "registry:2" in images and "busybox:latest" in images
    assert subprocess.run(["skopeo", "--version"], capture_output=True, timeout=30).returncode == 0


# ------------------------------------------------------------------ status, extra hosts, idempotence


def test_status_is_all_green(lab):
    st = lab.status()
    assert st["ok"], st
    assert st["hosts"]["ceph1"]["ceph_health"] == "HEALTH_OK"
    assert st["hosts"]["registry1"]["registry_image"] is True
    assert st["control"]["docker"] is True
    assert st["processes"] >= 9 and st["rss_mb"] > 100
    cp = subprocess.run([sys.executable, "-m", "runbook_lib.lab", "status"], capture_output=True, text=True,
                        timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_up_on_a_healthy_lab_changes_nothing(lab, capsys):
    before = {h: lab.host_pid(h) for h in lab.HOSTS}
    t = time.monotonic()
    st = lab.up()
    assert time.monotonic() - t < 5
    assert st["ok"]
    assert {h: lab.host_pid(h) for h in lab.HOSTS} == before
    assert "already up" in capsys.readouterr().out


def test_add_and_remove_a_bare_host(lab):
    name, addr = "labtest-bare", "198.18.0.250"
    lab.remove_host(name)
    lab.add_host(name, addr)
    try:
        assert lab.hosts()[name] == addr
        assert f"{addr} ssh-ed25519 " in lab.KNOWN_HOSTS.read_text()
        assert ssh(lab, addr, "hostname").stdout.strip() == name
        # known_hosts also has it by name (the control node does not resolve lab names: use the alias)
        assert ssh(lab, addr, "hostname", opts=("-o", f"HostKeyAlias={name}")).stdout.strip() == name
        # bare: no ceph keyring, no docker; sees the others by name
        assert ssh(lab, addr, "test -e /etc/ceph/ceph.client.admin.keyring", check=False).returncode != 0
        assert ssh(lab, addr, "getent hosts ceph1").stdout.split()[0] == "198.18.0.2"
        assert "labtest-bare" in lab.host_exec("ceph1", ["cat", "/etc/hosts"]).stdout
        assert lab.add_host(name, addr) == addr  # idempotent
        with pytest.raises(lab.LabError):
            lab.add_host("labtest-other", addr)
        st = lab.status()
        assert st["hosts"][name]["ok"] and st["ok"]
    finally:
        lab.remove_host(name)
    assert name not in lab.hosts()
    assert addr not in lab.KNOWN_HOSTS.read_text()
    assert not os.path.exists(f"/run/netns/rbl-{name}")
    assert "labtest-bare" not in lab.host_exec("ceph1", ["cat", "/etc/hosts"]).stdout
    assert ssh(lab, "ceph1", "hostname").stdout.strip() == "ceph1"


def test_a_dead_host_is_replaced_at_the_same_address(lab):
    """Re-creating a host at an address the bridge has just seen must answer at once (fixed MACs:
    a fresh random MAC left a stale ARP entry and ~20 s without connectivity)."""
    import signal
    name, addr = "labtest-dead", "198.18.0.252"
    lab.remove_host(name)
    lab.add_host(name, addr)
    try:
        assert ssh(lab, addr, "hostname").stdout.strip() == name
        os.kill(lab.host_pid(name), signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(lab.LabError, match="not running"):
            lab.host_exec(name, ["true"])
        t = time.monotonic()
        lab.add_host(name, addr)
        assert time.monotonic() - t < 5
        assert ssh(lab, addr, "hostname").stdout.strip() == name
    finally:
        lab.remove_host(name)


def test_add_a_docker_host(lab):
    name, addr = "labtest-dock", "198.18.0.251"
    lab.remove_host(name)
    lab.add_host(name, addr, docker=True)
    try:
        images = ssh(lab, addr, "docker images --format '{{.Repository}}:{{.Tag}}'").stdout.split()
        assert "registry:2" in images
        assert lab.status()["hosts"][name]["ok"]
    finally:
        lab.remove_host(name)


# ------------------------------------------------------------------ restart (last: leaves the lab up)


def _nothing_left(lab):
    from runbook_lib._lab_proc import mounts_under
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith("rbl-")], netns
    links = os.listdir("/sys/class/net")
    assert not [l for l in links if l.startswith("rbl-") or l == "rblab0"], links
    assert lab.lab_processes() == set()
    assert mounts_under([str(lab.LAB_DIR), str(lab.RUN_DIR)]) == []
    assert sorted(os.listdir(lab.LAB_DIR)) == ["ssh"]
    assert not os.path.exists("/var/run/docker.sock")
    assert not os.path.exists("/var/lib/containers/cache")
    certs = os.listdir("/etc/docker/certs.d") if os.path.isdir("/etc/docker/certs.d") else []
    assert not [d for d in certs if d.startswith("198.18.")], certs


@pytest.mark.lab_restart
@pytest.mark.skipif(os.environ.get("RUNBOOK_LAB_NO_RESTART") == "1", reason="RUNBOOK_LAB_NO_RESTART=1")
def test_down_twice_then_up(lab):
    def base_known():  # hosts other sessions added with add_host() do not come back with up()
        keep = set(lab.HOSTS) | set(lab.HOSTS.values())
        return [l for l in lab.KNOWN_HOSTS.read_text().splitlines() if l.split()[0] in keep]
    key = lab.SSH_KEY.read_text()
    known = base_known()
    assert len(known) == 4
    try:
        os.makedirs("/etc/docker/certs.d/198.18.0.3:8000", exist_ok=True)
        with open("/etc/docker/certs.d/198.18.0.3:8000/ca.crt", "w") as f:
            f.write("stale\n")
        lab.down()
        _nothing_left(lab)
        lab.down()
        _nothing_left(lab)
        assert not lab.status()["ok"]
    finally:
        st = lab.up()
    assert st["ok"], st
    # the ssh identity survives a restart: same client key, same host keys
    assert lab.SSH_KEY.read_text() == key
    assert base_known() == known
    assert set(lab.hosts()) == set(lab.HOSTS)
    assert ssh(lab, "ceph1", "ceph health").stdout.strip() == "HEALTH_OK"
