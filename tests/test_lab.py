"""The local lab itself, checked from the outside: hosts that are real Debian machines (own root
file system and dpkg database, systemd as PID 1, sshd started by systemd, user k8s with sudo),
real OpenSSH with strict host keys, real Ceph under systemd, docker.service with the locally
built registry:2 image, apt through the lab's caching proxy.

Uses the session `lab` fixture (conftest: `lab.up()`, idempotent) and leaves the lab UP.
Hosts the tests add themselves live on 198.18.0.24x and are removed again.  The restart test
(down, down, up) runs last; set RUNBOOK_LAB_NO_RESTART=1 to skip it while other test sessions
share the lab.
"""
from __future__ import annotations

import os
import signal
import pathlib
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
    assert _lab_ok(st), st


def _lab_ok(st) -> bool:
    """The lab's own hosts and the control node (hosts others added are theirs to judge)."""
    return all(st["hosts"][n]["ok"] for n in lab_hosts()) and st["control"]["ok"]


def lab_hosts():
    from runbook_lib import lab
    return lab.HOSTS


def ssh(lab, host: str, command: str, check: bool = True, timeout: float = 60, user: str = "k8s",
        opts: tuple = ()) -> subprocess.CompletedProcess:
    """The exact OpenSSH invocation a user would type (plus BatchMode so it can never prompt)."""
    argv = ["ssh", "-i", str(lab.SSH_KEY), "-o", f"UserKnownHostsFile={lab.KNOWN_HOSTS}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", *opts,
            f"{user}@{lab.HOSTS.get(host, host)}", command]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert cp.returncode == 0, f"{command!r} on {host}: exit {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    return cp


@pytest.fixture
def extra_host(lab):
    """extra_host(name, addr, **add_host kwargs) -> addr; removed again after the test."""
    made = []

    def make(name, addr, ceph_overrides=None, **kw):
        lab.remove_host(name)
        made.append(name)
        if ceph_overrides is not None:
            return lab.add_ceph_host(name, addr, conf_overrides=ceph_overrides)
        return lab.add_host(name, addr, **kw)
    yield make
    for n in made:
        lab.remove_host(n)


# ------------------------------------------------------------------ contract


def test_contract_paths_and_addresses(lab):
    assert str(lab.LAB_DIR) == "/var/lib/runbook-lab"
    assert str(lab.SSH_KEY) == "/var/lib/runbook-lab/ssh/id_ed25519"
    assert str(lab.KNOWN_HOSTS) == "/var/lib/runbook-lab/ssh/known_hosts"
    assert lab.HOSTS == {"ceph1": "198.18.0.2", "registry1": "198.18.0.3"}
    assert lab.SSH_USER == "k8s"
    assert lab.SSH_KEY.with_suffix(".pub").exists()
    assert oct(lab.SSH_KEY.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("host", BASE_HOSTS)
def test_ssh_with_strict_host_key_prints_hostname(lab, host):
    assert ssh(lab, host, "hostname").stdout.strip() == host
    assert ssh(lab, host, "id -un").stdout.strip() == "k8s"


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
                         f"k8s@{lab.HOSTS['registry1']}", "hostname"],
                        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert cp.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in cp.stderr or "Host key verification failed" in cp.stderr


def test_sftp_subsystem_works(lab, tmp_path):
    (tmp_path / "hello.txt").write_text("hello lab\n")
    cp = subprocess.run(["sftp", "-b", "-", "-i", str(lab.SSH_KEY), "-o", f"UserKnownHostsFile={lab.KNOWN_HOSTS}",
                         "-o", "StrictHostKeyChecking=yes", f"k8s@{lab.HOSTS['registry1']}"],
                        input=f"put {tmp_path / 'hello.txt'} /tmp/hello-from-sftp.txt\n",
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert lab.host_exec("registry1", ["cat", "/tmp/hello-from-sftp.txt"]).stdout == "hello lab\n"
    lab.host_exec("registry1", ["rm", "-f", "/tmp/hello-from-sftp.txt"])


# ------------------------------------------------------------------ hosts are real machines


@pytest.mark.parametrize("host", BASE_HOSTS)
def test_systemd_is_pid_1_and_running(lab, host):
    assert lab.host_exec(host, ["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert ssh(lab, host, "ps -o comm= -p 1").stdout.strip() == "systemd"
    cp = ssh(lab, host, "systemctl is-system-running", check=False)
    assert cp.stdout.strip() == "running", ssh(lab, host, "systemctl --failed", check=False).stdout
    assert ssh(lab, host, "systemctl is-active ssh.service").stdout.strip() == "active"
    # its own pid namespace: only its own processes (a handful), not the control node's
    procs = ssh(lab, host, "ps -e -o args=").stdout
    assert "pytest" not in procs and len(procs.splitlines()) < len(os.listdir("/proc"))
    # the host's systemd is the process host_pid() names, seen from outside
    assert open(f"/proc/{lab.host_pid(host)}/comm").read().strip() == "systemd"
    assert lab.status()["hosts"][host]["systemd"] == "running"


@pytest.mark.parametrize("host", BASE_HOSTS)
def test_root_login_refused_and_k8s_has_sudo(lab, host):
    cp = ssh(lab, host, "true", check=False, user="root")
    assert cp.returncode == 255 and "Permission denied" in cp.stderr, cp.stderr
    assert ssh(lab, host, "sudo -n true").returncode == 0
    assert ssh(lab, host, "sudo -n id -u").stdout.strip() == "0"


def test_hosts_have_private_filesystems(lab):
    """A file written on one host is seen on none of the others nor on the control node."""
    marker = f"/root/labtest-{os.getpid()}"
    lab.host_exec("ceph1", ["sh", "-c", f"echo ceph1 > {marker}"])
    try:
        assert lab.host_exec("registry1", ["test", "-e", marker], check=False).returncode != 0
        assert not os.path.exists(marker)
        assert ssh(lab, "ceph1", f"sudo cat {marker}").stdout == "ceph1\n"
    finally:
        lab.host_exec("ceph1", ["rm", "-f", marker])
    # and the other way round, from the control node into registry1 (through host_path)
    p = lab.host_path("registry1", "/etc/labtest-from-control")
    with open(p, "w") as f:
        f.write("x\n")
    try:
        assert lab.host_exec("registry1", ["cat", "/etc/labtest-from-control"]).stdout == "x\n"
        assert lab.host_exec("ceph1", ["test", "-e", "/etc/labtest-from-control"], check=False).returncode != 0
        assert not os.path.exists("/etc/labtest-from-control")
    finally:
        os.unlink(p)
    # ceph1's admin keyring is only on ceph1; the root file system is the host's overlay
    assert lab.host_exec("ceph1", ["test", "-s", "/etc/ceph/ceph.client.admin.keyring"], check=False).returncode == 0
    assert lab.host_exec("registry1", ["test", "-e", "/etc/ceph/ceph.client.admin.keyring"],
                         check=False).returncode != 0
    assert not os.path.exists("/etc/ceph/ceph.client.admin.keyring")
    mounts = lab.host_exec("ceph1", ["cat", "/proc/self/mounts"]).stdout.splitlines()
    assert mounts[0].split()[:3] == ["overlay", "/", "overlay"]
    assert "upperdir=/var/lib/runbook-lab/hosts/ceph1/upper" in mounts[0]
    # none of it shows in the control node's mount table
    with open("/proc/self/mounts") as f:
        assert not [l for l in f if "/var/lib/runbook-lab/hosts/" in l]


def test_each_host_has_its_own_dpkg_database(lab, extra_host):
    """A fresh ceph-role host has the Ceph daemons but NOT radosgw (01-rgw installs it); the
    docker host has docker.io and no Ceph."""
    extra_host("labtest-dpkg", "198.18.0.241", role="ceph")
    assert lab.host_exec("labtest-dpkg", ["dpkg", "-s", "ceph-mon"], check=False).returncode == 0
    cp = lab.host_exec("labtest-dpkg", ["dpkg", "-s", "radosgw"], check=False)
    assert cp.returncode != 0 and "not installed" in cp.stderr, cp.stdout + cp.stderr
    assert lab.host_exec("registry1", ["dpkg", "-s", "docker.io"], check=False).returncode == 0
    assert lab.host_exec("registry1", ["dpkg", "-s", "ceph-mon"], check=False).returncode != 0
    # the control node's own database is another one again
    assert subprocess.run(["dpkg", "-s", "mmdebstrap"], capture_output=True).returncode == 0
    assert lab.host_exec("registry1", ["dpkg", "-s", "mmdebstrap"], check=False).returncode != 0


def test_sudo_with_password_refuses_sudo_n(lab, extra_host):
    addr = extra_host("labtest-pw", "198.18.0.242", sudo="password")
    cp = ssh(lab, addr, "sudo -n true", check=False)
    assert cp.returncode != 0 and "password is required" in cp.stderr, cp.stderr
    assert ssh(lab, addr, "hostname").stdout.strip() == "labtest-pw"
    # the password works (sudo -S reads it from stdin)
    pw = (lab.LAB_DIR / "hosts" / "labtest-pw" / "sudo-password").read_text().strip()
    cp = subprocess.run(lab.ssh_argv(addr, "sudo -S -p '' id -u"), input=pw + "\n", capture_output=True,
                        text=True, timeout=30)
    assert cp.stdout.strip() == "0", cp.stderr


def test_hosts_see_each_other_by_address_and_name(lab):
    r = lab.host_exec("registry1", ["bash", "-c",
                                    "for p in 3300 6789; do timeout 5 bash -c \"echo > /dev/tcp/198.18.0.2/$p\" "
                                    "|| exit 1; done; getent hosts ceph1"])
    assert r.stdout.split()[:2] == ["198.18.0.2", "ceph1"]
    assert lab.host_exec("ceph1", ["bash", "-c", "timeout 5 bash -c 'echo > /dev/tcp/198.18.0.3/22'"]).returncode == 0
    assert lab.host_exec("ceph1", ["getent", "hosts", "control"]).stdout.split()[0] == "198.18.0.1"
    assert lab.host_exec("registry1", ["ip", "-o", "-4", "addr", "show", "eth0"]).stdout.split()[3] == "198.18.0.3/24"


def test_host_exec_failure_raises_lab_error(lab):
    with pytest.raises(lab.LabError) as ei:
        lab.host_exec("ceph1", ["sh", "-c", "echo boom >&2; exit 3"])
    assert "exit 3" in str(ei.value) and "boom" in str(ei.value)
    assert ei.value.stderr == "boom" and ei.value.returncode == 3
    assert lab.host_exec("ceph1", ["sh", "-c", "exit 3"], check=False).returncode == 3
    assert lab.host_exec("ceph1", ["cat"], input="x\n").stdout == "x\n"
    assert lab.host_exec("ceph1", ["sh", "-c", "echo $HOME $(id -u) $(hostname)"]).stdout.split() == \
        ["/root", "0", "ceph1"]
    with pytest.raises(lab.LabError, match="not running"):
        lab.host_exec("no-such-host", ["true"])


# ------------------------------------------------------------------ apt through the proxy


def _proxy_log_size(lab) -> int:
    try:
        return os.path.getsize(lab.LAB_DIR / "proxy" / "log" / "apt-cacher.log")
    except OSError:
        return 0


def _proxy_log(lab, since: int) -> list[list[str]]:
    """apt-cacher-ng's transfer log since byte `since`: [time, I|O, bytes, client, path];
    I = fetched from the mirror, O = delivered to a client."""
    with open(lab.LAB_DIR / "proxy" / "log" / "apt-cacher.log") as f:
        f.seek(since)
        return [l.rstrip("\n").split("|") for l in f if l.count("|") >= 4]


def test_apt_install_goes_through_the_proxy_and_its_cache(lab, extra_host):
    """apt-get update + install in one fresh host; the same install in a second fresh host is
    served from the proxy's cache (an O(ut) line for the .deb with no I(n) line from the mirror)."""
    pkg = "hello"
    script = f"apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q {pkg} && {pkg}"
    first = extra_host("labtest-apt1", "198.18.0.243")
    off = _proxy_log_size(lab)
    cp = ssh(lab, first, f"sudo sh -c '{script}'", timeout=300)
    assert "Hello, world!" in cp.stdout
    lines = _proxy_log(lab, off)
    debs = [l for l in lines if l[1] == "O" and f"/{pkg}_" in l[4] and l[4].endswith(".deb")]
    assert debs and debs[0][3] == first, lines[-5:]
    deb_path = debs[0][4]
    second = extra_host("labtest-apt2", "198.18.0.244")
    off = _proxy_log_size(lab)
    ssh(lab, second, f"sudo sh -c '{script}'", timeout=300)
    lines = _proxy_log(lab, off)
    assert [l for l in lines if l[1] == "O" and l[4] == deb_path and l[3] == second], lines
    assert not [l for l in lines if l[1] == "I" and l[4] == deb_path], "second install fetched from the mirror"
    # the hosts' apt really uses the proxy, and the control node's sources
    conf = lab.host_exec("labtest-apt2", ["apt-config", "dump", "Acquire::http::Proxy"]).stdout
    assert '"http://198.18.0.1:3142"' in conf
    assert lab.host_exec("labtest-apt2", ["cat", "/etc/apt/sources.list.d/debian.sources"]).stdout == \
        open("/etc/apt/sources.list.d/debian.sources").read()


# ------------------------------------------------------------------ ceph1


def test_ceph_is_health_ok_over_ssh(lab):
    out = ssh(lab, "ceph1", "sudo ceph -s").stdout
    assert "HEALTH_OK" in out, out
    assert "1 osds: 1 up" in out and "1 in" in out, out
    assert "mon: 1 daemons, quorum a" in out, out
    assert "mgr: x(active" in out, out
    # the admin keyring is root's: k8s needs sudo, as on a real cluster node
    cp = ssh(lab, "ceph1", "ceph --connect-timeout 5 -s", check=False)
    assert cp.returncode != 0
    assert ssh(lab, "ceph1", "stat -c '%a %U' /etc/ceph/ceph.client.admin.keyring /etc/ceph/ceph.conf").stdout.split() \
        == ["600", "root", "644", "root"]


def test_ceph_runs_under_systemd(lab):
    units = ["ceph-mon@a", "ceph-mgr@x", "ceph-osd@0"]
    assert ssh(lab, "ceph1", "systemctl is-active " + " ".join(units)).stdout.split() == ["active"] * 3
    assert ssh(lab, "ceph1", "systemctl is-enabled " + " ".join(units)).stdout.split() == ["enabled"] * 3
    main_pid = ssh(lab, "ceph1", "systemctl show -p MainPID --value ceph-mon@a").stdout.strip()
    assert ssh(lab, "ceph1", f"ps -o user=,comm= -p {main_pid}").stdout.split() == ["ceph", "ceph-mon"]
    for f in ["/etc/systemd/system/ceph-osd@.service.d/order.conf",
              "/etc/systemd/system/ceph-radosgw@.service.d/order.conf"]:
        assert "After=ceph-mon.target" in lab.host_exec("ceph1", ["cat", f]).stdout


def test_ceph_runs_with_the_lab_settings(lab):
    conf = lab.host_exec("ceph1", ["cat", "/etc/ceph/ceph.conf"]).stdout
    for line in ["osd pool default size = 1", "osd pool default min size = 1", "mon allow pool size one = true",
                 "osd crush chooseleaf type = 0", "osd objectstore = memstore", "osd fast shutdown = false",
                 "osd pool default pg num = 8", "osd pool default pgp num = 8",
                 "osd pool default pg autoscale mode = off", "paxos propose interval = 0.1",
                 "mon data avail warn = 5", "memstore device bytes = 4294967296",
                 "auth cluster required = cephx", "mon host = [v2:198.18.0.2:3300,v1:198.18.0.2:6789]"]:
        assert line in conf, line
    show = lab.host_exec("ceph1", ["ceph", "config", "show", "osd.0", "osd_objectstore"]).stdout.strip()
    assert show == "memstore"


def test_reboot_brings_enabled_units_back(lab, extra_host):
    """reboot(): poweroff, boot the same overlay: a file written before survives, ceph's units are
    active again by themselves and the cluster returns to HEALTH_OK; a second cluster's conf
    overrides (add_ceph_host) are in its ceph.conf."""
    name, addr = "labtest-ceph", "198.18.0.245"
    extra_host(name, addr, ceph_overrides={"osd pool default pg num": 16})
    assert "osd pool default pg num = 16" in lab.host_exec(name, ["cat", "/etc/ceph/ceph.conf"]).stdout
    assert lab.status()["hosts"][name]["ceph_health"] == "HEALTH_OK"
    ssh(lab, addr, "echo survived | sudo tee /root/before-reboot >/dev/null; sudo ceph osd pool create p1 8")
    old_pid = lab.host_pid(name)
    r = lab.reboot(name)
    assert lab.host_pid(name) != old_pid
    assert r["clean_poweroff"] and r["ssh"] < 30, r
    assert ssh(lab, addr, "sudo cat /root/before-reboot").stdout == "survived\n"
    units = ["ceph-mon@a", "ceph-mgr@x", "ceph-osd@0"]
    deadline = time.monotonic() + 60
    while True:
        st = lab.status()["hosts"][name]
        if st["ok"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert st["ok"] and st["ceph_health"] == "HEALTH_OK", st
    assert ssh(lab, addr, "systemctl is-active " + " ".join(units)).stdout.split() == ["active"] * 3
    assert "p1" in ssh(lab, addr, "sudo ceph osd pool ls").stdout.split()   # memstore data kept
    # the same disk: the upper dir the host booted on is the one it had
    mounts = lab.host_exec(name, ["cat", "/proc/self/mounts"]).stdout
    assert f"upperdir=/var/lib/runbook-lab/hosts/{name}/upper" in mounts


# ------------------------------------------------------------------ registry1 and control docker


def test_docker_on_registry1_over_ssh(lab):
    assert ssh(lab, "registry1", "systemctl is-active docker.service").stdout.strip() == "active"
    v = ssh(lab, "registry1", "sudo docker version --format '{{.Server.Version}}'").stdout.strip()
    assert v.startswith("20.10"), v
    images = ssh(lab, "registry1", "sudo docker images --format '{{.Repository}}:{{.Tag}}'").stdout.split()
    assert "registry:2" in images
    info = ssh(lab, "registry1", "sudo docker info --format '{{.Driver}} {{.DockerRootDir}}'").stdout.split()
    assert info == ["vfs", "/var/lib/docker"]


def test_registry_image_binary_runs(lab):
    for cmd in ["sudo docker run --rm --entrypoint registry registry:2 --version",
                "sudo docker run --rm --network host registry:2 --version"]:
        out = ssh(lab, "registry1", cmd).stdout
        assert "github.com/docker/distribution" in out and "2.8" in out, (cmd, out)
    cfg = ssh(lab, "registry1", "sudo docker image inspect registry:2 --format "
                                "'{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{json .Config.ExposedPorts}}'")
    assert cfg.stdout.split() == ['["/entrypoint.sh"]', '["/etc/docker/registry/config.yml"]', '{"5000/tcp":{}}']


def test_registry_garbage_collect_via_docker_exec(lab):
    name = f"labtest-registry-{os.getpid()}"
    d = "sudo docker"
    ssh(lab, "registry1", f"{d} rm -f {name} >/dev/null 2>&1; {d} run -d --name {name} --network none registry:2")
    try:
        ssh(lab, "registry1", f"{d} exec {name} mkdir -p /var/lib/registry/docker/registry/v2/repositories "
                              f"/var/lib/registry/docker/registry/v2/blobs")
        gc = ssh(lab, "registry1", f"{d} exec {name} registry garbage-collect --dry-run "
                                   f"/etc/docker/registry/config.yml", check=False)
        assert gc.returncode == 0, gc.stderr
        ps = ssh(lab, "registry1", f"{d} exec {name} ps").stdout
        assert "registry serve /etc/docker/registry/config.yml" in ps
    finally:
        ssh(lab, "registry1", f"{d} rm -f {name}", check=False)


def test_restart_docker_brings_restart_policy_containers_back(lab, extra_host):
    name, addr = "labtest-dockrs", "198.18.0.246"
    extra_host(name, addr, docker=True)
    ssh(lab, addr, "sudo docker run -d --name r1 --restart always --network host registry:2 >/dev/null")
    before = ssh(lab, addr, "sudo docker inspect -f '{{.State.Pid}}' r1").stdout.strip()
    lab.restart_docker(name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = ssh(lab, addr, "sudo docker inspect -f '{{.State.Running}} {{.State.Pid}}' r1").stdout.split()
        if st[0] == "true":
            break
        time.sleep(0.3)
    assert st[0] == "true" and st[1] != before, st


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
    assert all(st["hosts"][h]["systemd"] == "running" for h in BASE_HOSTS)
    assert st["control"]["docker"] is True and st["control"]["apt_proxy"] is True
    assert st["processes"] >= 9 and st["rss_mb"] > 100
    cp = subprocess.run([sys.executable, "-m", "runbook_lib.lab", "status"], capture_output=True, text=True,
                        timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_up_on_a_healthy_lab_changes_nothing(lab, capsys):
    before = {h: lab.host_pid(h) for h in lab.HOSTS}
    t = time.monotonic()
    st = lab.up()
    assert time.monotonic() - t < 5
    assert _lab_ok(st)
    assert {h: lab.host_pid(h) for h in lab.HOSTS} == before
    assert "already up" in capsys.readouterr().out


def test_up_leaves_the_lab_alone_when_only_an_added_host_is_unhealthy(lab, extra_host, capsys):
    """A broken added host (a test's, a helper's) must not make `lab up` rebuild the lab: that
    would kill every other added host and the deployments on the fixed ones."""
    name, addr = "labtest-sick", "198.18.0.248"
    extra_host(name, addr)
    lab.host_exec(name, ["systemd-run", "--unit=labtest-fail", "/bin/false"])  # systemd: degraded
    before = {h: lab.host_pid(h) for h in [*lab.HOSTS, name]}
    capsys.readouterr()
    st = lab.up()
    assert not st["ok"] and st["hosts"][name]["systemd"] == "degraded"
    assert {h: lab.host_pid(h) for h in [*lab.HOSTS, name]} == before
    out = capsys.readouterr().out
    assert "already up" in out and name in out and "rebuilding" not in out


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
        # bare: no ceph keyring, no docker; sees the others by name, and they see it
        assert ssh(lab, addr, "test -e /etc/ceph/ceph.client.admin.keyring", check=False).returncode != 0
        assert ssh(lab, addr, "command -v docker", check=False).returncode != 0
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
    assert not os.path.exists(f"/sys/fs/cgroup/pids/lab-{name}")
    assert not os.path.exists(lab.LAB_DIR / "hosts" / name)
    assert "labtest-bare" not in lab.host_exec("ceph1", ["cat", "/etc/hosts"]).stdout
    assert ssh(lab, "ceph1", "hostname").stdout.strip() == "ceph1"


def test_a_dead_host_is_replaced_at_the_same_address(lab):
    """Re-creating a host at an address the bridge has just seen must answer at once (fixed MACs:
    a fresh random MAC left a stale ARP entry and ~20 s without connectivity)."""
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
        assert time.monotonic() - t < 10
        assert ssh(lab, addr, "hostname").stdout.strip() == name
    finally:
        lab.remove_host(name)


def test_add_a_docker_host(lab, extra_host):
    name, addr = "labtest-dock", "198.18.0.251"
    extra_host(name, addr, docker=True)
    images = ssh(lab, addr, "sudo docker images --format '{{.Repository}}:{{.Tag}}'").stdout.split()
    assert "registry:2" in images
    assert lab.status()["hosts"][name]["ok"]


def test_add_a_podman_host(lab, extra_host):
    """role=podman: the RHEL-style registry host of #18, podman with the registry image and no docker."""
    name, addr = "labtest-podman", "198.18.0.247"
    extra_host(name, addr, role="podman")
    r = ssh(lab, addr, "sudo podman images --format '{{.Repository}}:{{.Tag}}'; "
                       "sudo podman info --format '{{.Store.GraphDriverName}}'; command -v docker || echo no-docker")
    out = r.stdout.split()
    assert "docker.io/library/registry:2" in out and "vfs" in out and out[-1] == "no-docker", r.stdout
    assert lab.status()["hosts"][name]["ok"]


def test_images_under_running_hosts_are_known_in_use(lab):
    """A rebuild of a role's image (its package list changed) deletes the role's other versions,
    but never one a host runs on: it is that host's root file system."""
    from runbook_lib.lab import rootfs
    used = rootfs.images_in_use()
    for n in lab.HOSTS:
        image = pathlib.Path(lab._hosts.meta(n)["image"])
        assert image.name in used and (image / ".lab-image").exists()


def test_a_legacy_host_still_works(lab, extra_host):
    """systemd=False: the old kind of host (namespaces on the control node's file system, sshd as
    root, no systemd, its own dockerd when docker=True) for the runbook's no-systemd path."""
    name, addr = "labtest-legacy", "198.18.0.253"
    extra_host(name, addr, docker=True, systemd=False)
    assert ssh(lab, addr, "hostname", user="root").stdout.strip() == name
    assert lab.ssh_argv(name, "true")[-2] == f"root@{addr}"       # ssh_argv knows it logs in as root
    assert subprocess.run(lab.ssh_argv(name, "true"), capture_output=True, timeout=30).returncode == 0
    assert ssh(lab, addr, "id -un", check=False).returncode == 255  # no k8s user there
    assert lab.host_exec(name, ["cat", "/proc/1/comm"]).stdout.strip() != "systemd"
    assert lab.host_exec(name, ["hostname"]).stdout.strip() == name
    images = ssh(lab, addr, "docker images --format '{{.Repository}}:{{.Tag}}'", user="root").stdout.split()
    assert "registry:2" in images
    st = lab.status()["hosts"][name]
    assert st["ok"] and st.get("legacy"), st
    with pytest.raises(lab.LabError, match="legacy"):
        lab.reboot(name)


# ------------------------------------------------------------------ restart (last: leaves the lab up)


def _nothing_left(lab):
    from runbook_lib.lab.proc import mounts_under
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith("rbl-")], netns
    links = os.listdir("/sys/class/net")
    assert not [l for l in links if l.startswith("rbl-") or l == "rblab0"], links
    assert lab.lab_processes() == set()
    assert mounts_under([str(lab.LAB_DIR), str(lab.RUN_DIR)]) == []
    import glob
    assert glob.glob("/sys/fs/cgroup/*/lab-*") == []
    # kept across down: the ssh identity, the host images and the apt cache
    assert set(os.listdir(lab.LAB_DIR)) <= {"ssh", "rootfs", "apt-cache"}, os.listdir(lab.LAB_DIR)
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
    assert ssh(lab, "ceph1", "sudo ceph health").stdout.strip() == "HEALTH_OK"
    # a fresh lab: radosgw is not installed on ceph1 (01-rgw does that)
    assert lab.host_exec("ceph1", ["dpkg", "-s", "radosgw"], check=False).returncode != 0
