"""Section 7 (FAQ): unit tests of the decisions, and the notebook against each reproduced fault.

The lab tests never touch ceph1/registry1 (others use them): they make their own Ceph cluster
(`ceph416`, with `osd pool default pg num = 128`: the FAQ's 416) and registry host (`faqreg`),
deploy sections 1-4 there with a state dir of their own, break one thing per test, and restore
it in a finalizer; both hosts are removed at the end."""
from __future__ import annotations

import hashlib
import json
import pathlib
import time

import pytest
import requests

from runbook_lib import faq
from runbook_lib.host import cmd

from helpers import lab_host  # noqa: E402
from conftest import LAB_PARAMS, execute, outputs_text

CEPH_NAME, CEPH_ADDR = "ceph416", "198.18.0.20"
REG_NAME, REG_ADDR = "faqreg", "198.18.0.21"
PORT = LAB_PARAMS["registry_port"]


# ------------------------------------------------------------------ unit
def _pools(*pairs):
    return [{"name": n, "pg_num": pg, "size": 1} for n, pg in pairs]


def test_pg_budget_as_the_mon_counts():
    pools = _pools(("device_health_metrics", 1), (".rgw.root", 128), ("default.rgw.log", 128),
                   ("default.rgw.control", 128), ("default.rgw.meta", 128), ("default.rgw.buckets.index", 128))
    b = faq.pg_budget(pools, osds_in=1, limit=250, default_pg_num=128, default_size=1)
    # one OSD counts as 3: 250 x 3 = 750; 641 + 128 = 769 > 750 -> the data pool is refused
    assert b["capacity"] == 750 and b["pgs"] == 641 and b["missing"] == ["default.rgw.buckets.data"]
    assert b["refused"] == ["default.rgw.buckets.data"]
    assert faq.raised_limit(b) == 500
    ok = faq.pg_budget(_pools((".rgw.root", 8)), osds_in=1, limit=250, default_pg_num=8, default_size=1)
    assert ok["refused"] == [] and len(ok["missing"]) == 5
    big = faq.pg_budget(_pools(("a", 4096)), osds_in=3, limit=250, default_pg_num=128, default_size=3)
    assert faq.raised_limit(big) > 500 and faq.raised_limit(big) % 50 == 0


def test_conf_sets_any_spelling_and_set_conf_value_in_place():
    text = "[global]\nfsid = x\nmon_max_pg_per_osd = 13  # low\n\n[osd]\nmon-max-pg-per-osd=13\n[client.rgw.a]\nx = 1\n"
    assert faq.conf_sets(text) == {"global": "13", "osd": "13"}
    assert faq.conf_sets("[global]\nfsid = x\n") == {}
    new = faq.set_conf_value(text, ["global", "osd"], faq.LIMIT_KEY, 500)
    assert faq.conf_sets(new) == {"global": "500", "osd": "500"}
    assert "fsid = x" in new and "[client.rgw.a]\nx = 1" in new
    assert faq.conf_sets(text, "osd pool default pg num") == {}


def test_add_selinux_label():
    a = ["docker", "run", "-v", "/opt/a:/a", "-v", "/opt/b:/b:ro", "registry:2"]
    assert faq.add_selinux_label(a) == ["docker", "run", "-v", "/opt/a:/a:z", "-v", "/opt/b:/b:ro", "registry:2"]


# HostConfig.Binds as `podman inspect` shows them (podman 4.3; a :Z mount keeps Z in its options)
PODMAN_BINDS = ["/opt/k8s/registry/config.yml:/etc/docker/registry/config.yml:rw,rprivate,rbind",
                "/opt/k8s/registry/auth:/auth:rw,rprivate,rbind", "/opt/k8s/registry/certs:/certs:rw,rprivate,rbind"]
LABELLED = [b.replace(":rw,", ":Z,rw,") for b in PODMAN_BINDS]
# the registry's own lines when SELinux denies it its mounts (it runs as root: only a label refuses it)
DENIED_CERTS = ['time="2026-12-01T11:39:13Z" level=fatal msg="open /certs/registry.pem: permission denied"']
DENIED_CONFIG = ["configuration error: open /etc/docker/registry/config.yml: permission denied"]


def test_parse_binds_and_selinux_mode():
    b = faq.parse_binds(LABELLED + ["vol123:/var/lib/registry:rprivate,rw,nodev", "/x:/y"])
    assert b[2] == {"source": "/opt/k8s/registry/certs", "destination": "/certs", "options": ["Z", "rw", "rprivate",
                                                                                               "rbind"]}
    assert b[-1] == {"source": "/x", "destination": "/y", "options": []}
    assert [faq.selinux_mode(x) for x in ("Enforcing\n", "Permissive", "Disabled", "1", "0", "absent", "", None)] == \
        ["enforcing", "permissive", "disabled", "enforcing", "permissive", "absent", "absent", "absent"]


@pytest.mark.parametrize("selinux, binds, logs, denied, want", [
    ("enforcing", PODMAN_BINDS, DENIED_CERTS, [], ["/certs"]),                 # the document's 503, podman's words
    ("enforcing", PODMAN_BINDS, DENIED_CONFIG, [], ["/etc/docker/registry/config.yml"]),
    ("enforcing", PODMAN_BINDS, [], ["/auth/htpasswd"], ["/auth"]),            # seen by podman exec, not logged
    ("enforcing", LABELLED, DENIED_CERTS, [], None),    # labelled: SELinux is not why (file modes, user)
    ("permissive", PODMAN_BINDS, DENIED_CERTS, [], None),  # permissive only logs: the denial is not SELinux's
    ("absent", PODMAN_BINDS, DENIED_CERTS, [], None),      # Debian: no SELinux at all (the lab)
    ("enforcing", PODMAN_BINDS, ["open /var/lib/other: permission denied"], [], None),  # not a mount of ours
])
def test_selinux_label_problem(selinux, binds, logs, denied, want):
    got = faq.selinux_label_problem(selinux, faq.parse_binds(binds), logs, denied)
    assert (got and got["mounts"]) == want


def test_classify_names_the_selinux_label_with_podmans_fix():
    reg = _healthy_reg(running=False, files={}, state="no container named registry; container-registry.service failed",
                       log_lines=DENIED_CERTS, selinux="enforcing", runtime="podman",
                       binds=faq.parse_binds(PODMAN_BINDS))
    f = faq.classify(_ev(registry={"g": reg}))
    assert [x.cause for x in f] == ["selinux-volume-label"] and f[0].fixable
    assert ":Z" in f[0].fix and "not the document's --privileged" in f[0].fix and "/certs" in " ".join(f[0].evidence)
    # docker's Binds have no options unless given: the runbook's docker fix relabels with :z
    docker = dict(reg, runtime="docker", binds=faq.parse_binds([b.split(":rw")[0] for b in PODMAN_BINDS]))
    f = faq.classify(_ev(registry={"g": docker}))
    assert [x.cause for x in f] == ["selinux-volume-label"] and ":z on every -v" in f[0].fix
    # the same log on a host without SELinux: a plain mount-access, fixed by running the container as 04 does
    reg.update(selinux="absent")
    f = faq.classify(_ev(registry={"g": reg}))
    assert [x.cause for x in f] == ["mount-access"] and ":Z" in f[0].fix and "--privileged" in f[0].fix


def test_classify_a_runtime_given_wrong_is_not_fixed_by_starting_another_registry():
    mism = {"engine": "podman", "text": "podman on g runs container registry; this run says runtime=docker"}
    f = faq.classify(_ev(registry={"g": _healthy_reg(running=False, state="no container named registry",
                                                     runtime_mismatch=mism)}))
    assert [x.cause for x in f] == ["registry-down"] and not f[0].fixable
    assert "-p runtime podman" in f[0].fix and mism["text"] in f[0].evidence


def test_hint_for_names_the_notebook_and_the_hosts():
    h = faq.hint_for("04-registry", {"rgw_host": "10.0.0.2", "rgw_port": 7480, "registry_host": ["a", "b"],
                                     "storage": "s3", "state_dir": ""})
    assert "notebooks/07-faq.ipynb" in h and "-p rgw_host 10.0.0.2" in h and "-p registry_host a,b" in h
    assert "-p storage s3" in h and "state_dir" not in h and "fix True" in h


def _healthy_reg(**kw):
    r = {"v2": {"anonymous": 401, "with_credentials": 200}, "storage": {"kind": "swift", "auth": "204",
         "container": "204"}, "running": True, "state": "running", "files": {f: "ok" for f in faq.MOUNTED},
         "log_lines": [], "log_hits": [], "selinux": "absent"}
    r.update(kw)
    return r


def _ev(**kw):
    ev = {"rgw": {"answers": True, "seen": "HTTP 200", "where": "r", "url": "http://r:7480", "process": "running"},
          "probe": {"name": "p", "container": 201, "object": 201},
          "ceph": {"budget": faq.pg_budget(_pools((".rgw.root", 8)), 1, 250, 8, 1)},
          "registry": {"g": _healthy_reg()}}
    ev.update(kw)
    return ev


def test_classify_healthy_is_no_problem():
    assert faq.classify(_ev()) == []
    assert repr(faq.Diagnosis([])) == "no problem found"


def test_classify_each_cause():
    c = lambda ev: [f.cause for f in faq.classify(ev)]  # noqa: E731
    assert c(_ev(probe={"name": "p", "container": 201, "object": 416})) == ["pg-limit"]
    assert c(_ev(rgw={"answers": False, "seen": "no answer", "where": "r"},
                 registry={"g": _healthy_reg(v2={"anonymous": 503, "with_credentials": 503},
                                             storage={"kind": "swift", "auth": "000"})})) == ["rgw-down"]
    assert c(_ev(registry={"g": _healthy_reg(running=False, storage={"kind": "swift", "auth": "401"})})) == \
        ["storage-credentials"]
    assert c(_ev(registry={"g": _healthy_reg(storage={"kind": "s3", "auth": "200", "container": "404"})})) == \
        ["storage-container-missing"]
    assert c(_ev(registry={"g": _healthy_reg(running=False, files={}, state="restarting",
                                             log_lines=["open /etc/docker/registry/config.yml: permission denied"])})) \
        == ["mount-access"]
    assert c(_ev(registry={"g": _healthy_reg(files={"/auth/htpasswd": "cannot be read"})})) == ["mount-access"]
    assert c(_ev(registry={"g": _healthy_reg(running=False, state="exited")})) == ["registry-down"]
    # RGW answers the control node, but the registry host gets no answer: a network path problem
    f = faq.classify(_ev(registry={"g": _healthy_reg(v2={"anonymous": 503, "with_credentials": 503},
                                                     storage={"kind": "swift", "auth": "000"})}))
    assert [x.cause for x in f] == ["rgw-unreachable-from-registry"] and not f[0].fixable
    assert "network path from g" in f[0].fix
    f = faq.classify(_ev(registry={"g": _healthy_reg(v2={"anonymous": 503, "with_credentials": 503})}))
    assert [x.cause for x in f] == ["unexplained"] and not f[0].fixable


def test_classify_pg_limit_fix_follows_where_the_limit_is_set():
    ev = _ev(probe={"name": "p", "container": 416})
    assert "ceph config set global mon_max_pg_per_osd 500" in faq.classify(ev)[0].fix
    ev["ceph"]["conf_sections"] = ["global"]
    assert "ceph.conf [global]" in faq.classify(ev)[0].fix
    # the trap: raised on the mon only, the write hangs
    ev = _ev(probe={"name": "p", "container": 201, "object": "timeout"})
    ev["ceph"]["limits_differ"] = "mons [500], OSDs [250]"
    assert [x.cause for x in faq.classify(ev)] == ["pg-limit"]


# ------------------------------------------------------------------ pure classification (no lab)
@pytest.mark.parametrize("text,fam", [
    ('Error response from daemon: Get "https://r:8000/v2/": x509: certificate signed by unknown authority', "x509"),
    ("http: server gave HTTP response to HTTPS client", "x509"),
    ("unauthorized: authentication required", "401"),
    ('Get "https://r:8000/v2/": dial tcp 10.0.0.1:8000: connect: connection refused', "refused"),
    ("Error response from daemon: login attempt to https://r:8000/v2/ failed with status: 503 Service Unavailable",
     "503"),
    ("received unexpected HTTP status: 500 Internal Server Error", "5xx"),
    ("416 Requested Range Not Satisfiable", "416"),
    ("", None),
])
def test_symptom_family(text, fam):
    assert faq.symptom_family(text) == fam


def test_symptom_address_and_order():
    assert faq.symptom_address('Get "https://faqreg1:8000/v2/": x509') == "faqreg1:8000"
    assert faq.symptom_address("unauthorized") is None
    a, b = faq.Finding("registry-down", "h"), faq.Finding("htpasswd-user-missing", "h")
    assert faq.order_findings([a, b], "401") == [b, a] and faq.order_findings([a, b], None) == [a, b]


# ------------------------------------------------------------------ lab helpers
def ssh(addr: str):
    return lab_host(addr)


def run_nb(d: pathlib.Path, name: str, expect_error=False, **params):
    params = {"rgw_host": CEPH_ADDR, "registry_host": REG_ADDR, "state_dir": str(d / "state"), **params}
    out = d / f"{name}-{time.monotonic_ns()}.ipynb"
    return outputs_text(execute(name, out, expect_error=expect_error, **params)[0]), out


def registry_session(d, auth=True) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.verify = str(d / "state" / "ca" / "ca.pem")
    if auth:
        s.auth = (LAB_PARAMS["registry_user"], (d / "state" / "secrets" / "registry_password").read_text().strip())
    return s


def v2(d) -> tuple:
    url = f"https://{REG_ADDR}:{PORT}/v2/"
    out = []
    for auth in (False, True):
        try:
            out.append(registry_session(d, auth).get(url, timeout=5).status_code)
        except requests.RequestException:
            out.append("down")
    return tuple(out)


def wait_v2(d, want, timeout=60):
    deadline = time.monotonic() + timeout
    while (seen := v2(d)) != want:
        assert time.monotonic() < deadline, f"/v2/ answers {seen}, waited for {want}"
        time.sleep(1)


def push_blob(d) -> int:
    """Upload a small unique blob through the registry API; the final PUT's status."""
    base = f"https://{REG_ADDR}:{PORT}"
    data = f"faq blob {time.time_ns()}".encode()
    s = registry_session(d)
    r = s.post(f"{base}/v2/faq/blob/blobs/uploads/", timeout=60)
    if r.status_code != 202:
        return r.status_code
    loc = requests.compat.urljoin(base, r.headers["Location"])
    r = s.put(loc + ("&" if "?" in loc else "?") + f"digest=sha256:{hashlib.sha256(data).hexdigest()}", data=data,
              headers={"Content-Type": "application/octet-stream"}, timeout=60)
    return r.status_code


def secrets_in(d) -> list[str]:
    r = ssh(CEPH_ADDR).run(cmd("radosgw-admin user info --uid=demo"), read=True, no_log=True)
    info = json.loads(r.stdout)
    out = [k["secret_key"] for k in info.get("keys", []) + info.get("swift_keys", [])]
    out += [p.read_text().strip() for p in (d / "state" / "secrets").iterdir() if p.is_file()]
    return [s for s in out if s]


def assert_no_secrets(d, *paths):
    leaks = secrets_in(d)
    for p in paths:
        raw = pathlib.Path(p).read_text()
        found = [s[:4] + "..." for s in leaks if s in raw]
        assert not found, f"secrets in {p}: {found}"


# ------------------------------------------------------------------ lab fixtures
@pytest.fixture(scope="module")
def faqlab(lab, tmp_path_factory):
    """ceph416 (a Ceph whose pools get 128 PGs: the 416) with RGW and the demo account, and
    faqreg with the registry (swift) deployed against it; removed at the end."""
    d = tmp_path_factory.mktemp("faq")
    try:
        lab.add_ceph_host(CEPH_NAME, CEPH_ADDR,
                          conf_overrides={"osd pool default pg num": 128, "osd pool default pgp num": 128})
        lab.add_host(REG_NAME, REG_ADDR, docker=True)
        for name in ("01-rgw", "02-accounts", "03-certs", "04-registry"):
            run_nb(d, name)
        yield d
    finally:
        for n in (REG_NAME, CEPH_NAME):
            try:
                lab.remove_host(n)
            except Exception:  # noqa: BLE001 - best effort, the next `lab up` clears leftovers
                pass


@pytest.fixture(scope="module")
def fixed416(faqlab):
    """The cluster with the 416 fixed (by the FAQ notebook, or directly if that test did not run)."""
    h = ssh(CEPH_ADDR)
    h.run(cmd("ceph config set global mon_max_pg_per_osd 500"))
    return faqlab


@pytest.fixture
def healthy_after(fixed416):
    """Whatever a test breaks: RGW running and the registry healthy again afterwards, even on failure."""
    yield fixed416
    run_nb(fixed416, "01-rgw")
    h = ssh(REG_ADDR)
    if h.run(cmd("docker inspect --format {f} registry", f="{{.Config.User}}"), read=True,
             check=False).stdout.strip():
        h.run(cmd("docker rm -f registry"))
    run_nb(fixed416, "04-registry")


# ------------------------------------------------------------------ lab: 416
@pytest.mark.lab
def test_416_diagnosed_then_fixed(faqlab):
    d = faqlab
    assert push_blob(d) != 201  # the registry cannot write: RGW cannot create its data pool
    text, out1 = run_nb(d, "07-faq", expect_error=True)
    assert "VERDICT 07-faq: FAIL — found pg-limit on 198.18.0.20" in text, text[-3000:]
    assert "too many PGs per OSD" in text and "pool_create returned (34)" in text
    assert "object 416" in text and "default.rgw.buckets.data" in text
    assert "ceph config set global mon_max_pg_per_osd 500" in text  # ceph.conf does not set it
    text, out2 = run_nb(d, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed pg-limit on 198.18.0.20" in text, text[-3000:]
    h = ssh(CEPH_ADDR)
    assert h.run(cmd("ceph config get osd mon_max_pg_per_osd"), read=True).stdout.strip() == "500"
    assert push_blob(d) == 201  # and the registry's push now works
    text, _ = run_nb(d, "07-faq")
    assert "VERDICT 07-faq: PASS — no problem found" in text, text[-2000:]
    assert_no_secrets(d, out1, out2)


# ------------------------------------------------------------------ lab: 503
@pytest.mark.lab
def test_healthy_registry_no_problem_found(fixed416):
    text, out = run_nb(fixed416, "07-faq")
    assert "VERDICT 07-faq: PASS — no problem found" in text, text[-2000:]
    assert "checked: pg-limit, rgw-down, storage-credentials" in text


@pytest.mark.lab
def test_rgw_stopped(healthy_after):
    d = healthy_after
    h = ssh(CEPH_ADDR)
    h.run(cmd("systemctl stop ceph-radosgw@rgw.ceph416"))  # stopped by hand, as an operator might
    wait_v2(d, (503, 503), timeout=60)  # 3 failed health checks, 10 s apart
    text, out1 = run_nb(d, "07-faq", expect_error=True)
    assert "found rgw-down on 198.18.0.20" in text, text[-3000:]
    assert "503" in text and "health check failed" in text
    text, out2 = run_nb(d, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed rgw-down" in text, text[-3000:]
    assert v2(d) == (401, 200)
    assert_no_secrets(d, out1, out2)


@pytest.mark.lab
def test_wrong_storage_credentials(healthy_after):
    d = healthy_after
    # the trap LAB.md lists: `key create --gen-secret` replaces the Swift key the registry uses
    ssh(CEPH_ADDR).run(cmd("radosgw-admin key create --subuser=demo:swift --key-type=swift --gen-secret"),
                       no_log=True)
    ssh(REG_ADDR).run(cmd("docker restart registry"))
    text, out1 = run_nb(d, "07-faq", expect_error=True)
    assert "found storage-credentials on 198.18.0.21" in text, text[-3000:]
    assert "HTTP 401" in text and "differs from the one RGW has now" in text
    text, out2 = run_nb(d, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed storage-credentials" in text, text[-3000:]
    assert v2(d) == (401, 200) and push_blob(d) == 201
    assert_no_secrets(d, out1, out2)


@pytest.mark.lab
def test_mounted_files_unreadable(healthy_after):
    """The document's 503: the container may not use its mounts (SELinux there). Here: the same
    container run as an unprivileged user, which the root-only files refuse."""
    d = healthy_after
    h = ssh(REG_ADDR)
    f = "{{range $k, $v := .Config.Labels}}{{$k}}={{$v}} {{end}}"
    label = [x for x in h.run(cmd("docker inspect --format {f} registry", f=f), read=True).stdout.split()
             if x.startswith("runbook.config-sha256=")][0]
    h.run(cmd("docker rm -f registry"))
    h.run(cmd("docker run -d --name registry --restart always --network host --user 65534:65534 --label {l} "
              "-v /opt/k8s/registry/auth:/auth -v /opt/k8s/registry/certs:/certs "
              "-v /opt/k8s/registry/config.yml:/etc/docker/registry/config.yml registry:2", l=label))
    time.sleep(2)
    text, out1 = run_nb(d, "07-faq", expect_error=True)
    assert "found mount-access on 198.18.0.21" in text, text[-3000:]
    assert "permission denied" in text and "65534" in text and ":z" in text
    text, out2 = run_nb(d, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed mount-access" in text, text[-3000:]
    assert h.run(cmd("docker inspect --format {f} registry", f="{{.Config.User}}"), read=True).stdout.strip() == ""
    assert v2(d) == (401, 200)
    assert_no_secrets(d, out1, out2)


@pytest.mark.lab
def test_416_with_the_limit_in_ceph_conf(lab, fixed416):
    """ceph.conf sets mon_max_pg_per_osd: `ceph config set` would change nothing (the file wins).
    The fix edits the file and injects the value into the mon AND the OSD, without a restart."""
    name, addr = "ceph416c", "198.18.0.22"
    try:
        lab.add_ceph_host(name, addr, conf_overrides={"osd pool default pg num": 128,
                                                      "osd pool default pgp num": 128, "mon max pg per osd": 250})
        d = fixed416
        for nb in ("01-rgw", "02-accounts"):
            run_nb(d, nb, rgw_host=addr)
        h = ssh(addr)
        pids = h.run(cmd("pidof ceph-mon ceph-osd"), read=True).stdout.split()
        text, _ = run_nb(d, "07-faq", expect_error=True, rgw_host=addr)
        assert "found pg-limit on 198.18.0.22" in text and "ceph.conf [global]" in text, text[-3000:]
        text, _ = run_nb(d, "07-faq", fix=True, rgw_host=addr)
        assert "VERDICT 07-faq: PASS — fixed pg-limit on 198.18.0.22" in text, text[-3000:]
        conf = h.read_file("/etc/ceph/ceph.conf").decode()
        assert faq.conf_sets(conf) == {"global": "500"}
        assert h.run(cmd("pidof ceph-mon ceph-osd"), read=True).stdout.split() == pids  # nothing restarted
    finally:
        lab.remove_host(name)


@pytest.mark.lab
def test_bad_probe_container_is_a_parameter_error(fixed416):
    text, _ = run_nb(fixed416, "07-faq", expect_error=True, probe_container="Bad_Name")
    assert "probe_container" in text and "nothing was changed" in text


def test_pure_helpers_of_the_401_x509_refused_and_5xx_causes():
    from passlib.hash import bcrypt
    ht = f"foo:{bcrypt.using(rounds=4, ident='2y').hash('right-pass')}\nbar:{{SHA}}x\n"
    assert faq.check_htpasswd(ht, "foo", "right-pass")["verifies"] is True
    assert faq.check_htpasswd(ht, "foo", "wrong-pass")["verifies"] is False
    assert faq.check_htpasswd(ht, "bar", "x")["bcrypt"] is False and faq.check_htpasswd(ht, "bar", "x")["verifies"] is False
    assert faq.check_htpasswd(ht, "baz", "x")["user_present"] is False
    assert "$2y$" not in json.dumps(faq.check_htpasswd(ht, "foo", "right-pass"))
    ls = lambda *a: [{"local": x, "procs": ["registry"]} for x in a]  # noqa: E731
    assert faq.listener_problem(ls("*:8000"), 8000)["ok"]
    assert faq.listener_problem(ls("127.0.0.1:8000"), 8000)["kind"] == "listening-elsewhere"
    assert faq.listener_problem(ls("*:5000"), 8000)["kind"] == "wrong-port"
    assert faq.listener_problem([{"local": "*:22", "procs": ["sshd"]}], 8000)["kind"] == "port-closed"
    assert faq.certs_d_state({"1.2.3.4:8000": "a"}, "reg:8000", ["1.2.3.4:8000"], "a") == {
        "state": "missing", "others": ["1.2.3.4:8000"]}
    assert faq.certs_d_state({"reg:8000": "b"}, "reg:8000", [], "a")["state"] == "other-ca"
    assert faq.quota_usage({"enabled": True, "max_objects": 10, "max_size": -1}, 0, 10) == [
        "10 of max 10 objects (100%)"]
    assert faq.quota_usage({"enabled": False, "max_objects": 1}, 0, 10) == []
    import base64
    cfg = json.dumps({"auths": {"r:8000": {"auth": base64.b64encode(b"foo:old-pass").decode()}}})
    assert faq.stored_login(cfg, "r:8000", "foo", "new-pass") == {"state": "stale", "user": "foo"}
    assert faq.stored_login(cfg, "r:8000", "foo", "old-pass")["state"] == "current"
    assert faq.stored_login("{}", "r:8000", "foo", "x")["state"] == "absent"


def test_classify_the_new_causes():
    c = lambda ev: [f.cause for f in faq.classify(ev)]  # noqa: E731
    ht = {"path": "/opt/k8s/registry/auth/htpasswd", "kind": "file", "users": ["foo"], "user_present": True,
          "bcrypt": True, "verifies": True, "log": []}
    listen = faq.listener_problem([{"local": "*:8000", "procs": ["registry"]}], 8000)
    reg = lambda **kw: {"g": _healthy_reg(htpasswd=dict(ht, **kw.pop("ht", {})), listen=kw.pop("listen", listen),  # noqa: E731
                                          **{"port_open": "open", **kw})}
    assert c(_ev(registry=reg())) == []
    f = faq.classify(_ev(registry=reg(ht={"verifies": False, "env_differs": True, "state_verifies": True},
                                      v2={"anonymous": 401, "with_credentials": 401})))
    assert [x.cause for x in f] == ["htpasswd-wrong-password"] and not f[0].fixable and "unset REGISTRY_PASSWORD" in f[0].commands
    assert c(_ev(registry=reg(ht={"user_present": False, "users": ["alice"]}))) == ["htpasswd-user-missing"]
    assert c(_ev(registry=reg(ht={"kind": "directory"}, files={"/auth/htpasswd": "cannot be read"}))) == ["htpasswd-missing"]
    assert c(_ev(registry=reg(listen=faq.listener_problem([{"local": "*:5000", "procs": ["registry"]}], 8000),
                              port_open="refused", v2={"anonymous": "refused", "with_credentials": "refused"}))) == ["wrong-port"]
    assert c(_ev(account={"uid": "u", "suspended": True})) == ["rgw-user-suspended"]
    assert c(_ev(ceph={"osd_full": ["1 full osd(s): osd.0 is full"], "health": "HEALTH_ERR"})) == ["osd-full"]
    # the report's first line says what to do
    rep = repr(faq.Diagnosis(faq.classify(_ev(account={"uid": "u", "suspended": True}))))
    assert rep.startswith("what to do: 1. rgw-user-suspended") and "radosgw-admin user enable --uid=u" in rep
