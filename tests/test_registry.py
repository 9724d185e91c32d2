"""Section 4 (registry): unit tests of the pure parts, and the notebook on the lab for each
storage backend.  The lab tests run in file order and leave the registry deployed with
storage swift (the default), which section 5 builds on."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time

import pytest
import requests
import yaml

from runbook_lib import registry
from runbook_lib.host import cmd

from helpers import lab_host  # noqa: E402
from conftest import LAB_PARAMS, outputs_text

# RUNBOOK_TEST_REGISTRY_HOST: run against another lab host (lab.add_host), away from other users of registry1
from conftest import TEST_REGISTRY as REGISTRY  # noqa: E402
RGW = LAB_PARAMS["rgw_host"]
URL = f"https://{REGISTRY}:{LAB_PARAMS['registry_port']}"


# ------------------------------------------------------------------ unit: config
def _render(storage, **kw):
    base = dict(port=8000, http_secret="s3cr3t-http", rgw_url="http://10.0.0.2:7480", swift_user="demo:swift",
                swift_key="swiftkey", s3_access="AK", s3_secret="SK")
    base.update(kw)
    return registry.render_config(storage, **base)


def test_render_swift_is_the_documents_config_corrected():
    cfg = _render("swift")
    assert cfg["log"]["formatter"] == "text" and "fromatter" not in cfg["log"]
    assert cfg["storage"]["swift"] == {"authurl": "http://10.0.0.2:7480/auth/v1", "username": "demo:swift",
                                       "password": "swiftkey", "container": "registry"}
    assert cfg["storage"]["cache"] == {"blobdescriptor": "inmemory"} and cfg["storage"]["delete"] == {"enabled": True}
    assert cfg["auth"]["htpasswd"]["path"] == "/auth/htpasswd"
    assert cfg["http"]["addr"] == "0.0.0.0:8000" and cfg["http"]["secret"] == "s3cr3t-http"
    assert cfg["http"]["tls"] == {"certificate": "/certs/registry.pem", "key": "/certs/registry-key.pem"}
    assert cfg["http"]["headers"] == {"X-Content-Type-Options": ["nosniff"]}
    assert cfg["health"]["storagedriver"] == {"enabled": True, "interval": "10s", "threshold": 3}
    assert registry.validate_config(cfg, 2) == []
    assert yaml.safe_load(registry.to_yaml(cfg)) == cfg


def test_render_s3_and_filesystem():
    s3 = _render("s3", container="images")["storage"]["s3"]
    assert s3 == {"accesskey": "AK", "secretkey": "SK", "region": "us-east-1", "regionendpoint": "http://10.0.0.2:7480",
                  "bucket": "images", "forcepathstyle": True, "secure": False, "v4auth": True}
    assert _render("s3")["storage"]["redirect"] == {"disable": True}  # clients talk to the registry only
    assert registry.validate_config(_render("s3"), 3) == []
    fs = _render("filesystem")
    assert fs["storage"]["filesystem"] == {"rootdirectory": "/var/lib/registry"}
    assert "swift" not in fs["storage"] and "s3" not in fs["storage"]
    assert registry.validate_config(fs, 2) == []


def test_validation_errors():
    cfg = _render("swift")
    assert any("registry 3 removed the swift driver" in p for p in registry.validate_config(cfg, 3))
    cfg["log"]["fromatter"] = "text"
    assert any("'log.fromatter'" in p and "formatter" in p for p in registry.validate_config(cfg, 2))
    cfg = _render("swift", swift_key="")
    assert "missing value storage.swift.password" in registry.validate_config(cfg, 2)
    cfg = _render("s3", s3_secret="")
    assert "missing value storage.s3.secretkey" in registry.validate_config(cfg, 2)
    cfg = _render("filesystem")
    cfg["storage"]["inmemory"] = {}
    assert any("exactly one driver" in p for p in registry.validate_config(cfg, 2))
    cfg = _render("filesystem", http_secret="")
    assert "missing value http.secret" in registry.validate_config(cfg, 2)
    cfg = _render("filesystem", htpasswd_path="")
    assert "missing value auth.htpasswd.path" in registry.validate_config(cfg, 2)
    cfg = _render("filesystem")
    cfg["bogus"] = 1
    assert "unknown key 'bogus'" in registry.validate_config(cfg, 2)


def test_paths_per_runtime():
    assert registry.paths("docker", "/opt/x")["htpasswd"] == "/auth/htpasswd"
    p = registry.paths("systemd", "/opt/x")
    assert p["htpasswd"] == "/opt/x/auth/htpasswd" and p["config"] == "/etc/docker/registry/config.yml"


def test_render_unit():
    unit = registry.render_unit()
    assert "ExecStart=/usr/bin/docker-registry serve /etc/docker/registry/config.yml" in unit
    assert "UnsetEnvironment=AWS_CA_BUNDLE" in unit and "Restart=always" in unit
    assert "User=docker-registry" in unit and "WantedBy=multi-user.target" in unit


def test_curl_conf_escapes():
    c = registry._curl_conf(url="http://x/auth/v1", header=['X-Auth-Key: a"b\\c', "X-Auth-User: u"])
    assert c == 'url = "http://x/auth/v1"\nheader = "X-Auth-Key: a\\"b\\\\c"\nheader = "X-Auth-User: u"\n'


def test_docker_run_uses_host_network_and_label():
    class C:
        remote_dir, storage, image = "/opt/k8s/registry", "swift", "registry:2"
    a = registry.docker_run_argv(C, "abc")
    assert a[:3] == ["docker", "run", "-d"] and "--network" in a and "host" in a and "-p" not in a
    assert f"{registry.LABEL}=abc" in a and a[-1] == "registry:2"
    assert "/opt/k8s/registry/config.yml:/etc/docker/registry/config.yml" in a


# ------------------------------------------------------------------ unit: htpasswd
def test_htpasswd_keeps_verifying_hash_and_rehashes_on_cost_change():
    from passlib.apache import HtpasswdFile
    c1, rows = registry.build_htpasswd(None, {"foo": "pw-foo-1234"}, cost=5)
    assert c1.startswith(b"foo:$2y$05$") and rows[0]["hash"].startswith("new")
    c2, rows = registry.build_htpasswd(c1, {"foo": "pw-foo-1234"}, cost=5)
    assert c2 == c1 and rows[0]["hash"].startswith("kept")
    c3, _ = registry.build_htpasswd(c1, {"foo": "pw-foo-1234"}, cost=6)
    assert c3.startswith(b"foo:$2y$06$")
    c4, _ = registry.build_htpasswd(c1, {"foo": "another-password"}, cost=5)
    assert c4 != c1 and HtpasswdFile.from_string(c4).check_password("foo", "another-password")


def test_htpasswd_add_remove_keeps_others():
    c1, _ = registry.build_htpasswd(None, {"foo": "pw-foo-1234", "bob": "pw-bob-1234"}, cost=4)
    c2, rows = registry.build_htpasswd(c1, {"foo": "pw-foo-1234"}, remove=["bob"], cost=4)
    assert b"bob:" not in c2 and {"user": "bob", "hash": "removed"} in rows
    c3, _ = registry.build_htpasswd(c1, {"foo": "pw-foo-1234"}, cost=4)
    assert b"bob:" in c3  # not listed != removed
    c4, rows = registry.build_htpasswd(c1, {"foo": "pw-foo-1234"}, cost=4, rotate=["foo"])
    assert "rotated" in rows[0]["hash"]


# ------------------------------------------------------------------ lab helpers
def ssh(addr: str):
    return lab_host(addr)


def password(state_dir) -> str:
    return (pathlib.Path(state_dir) / "secrets" / "registry_password").read_text().strip()


def sess(state_dir, user="foo", pw=None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE is set on these machines
    s.verify = str(pathlib.Path(state_dir) / "ca" / "ca.pem")
    s.auth = (user, pw if pw is not None else password(state_dir))
    return s


def push_blob(state_dir, repo="runbook-test/blob") -> str:
    """Upload a small unique blob through the registry API; returns its sha256 hex."""
    data = f"runbook blob {time.time_ns()}".encode()
    hexd = hashlib.sha256(data).hexdigest()
    s = sess(state_dir)
    r = s.post(f"{URL}/v2/{repo}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, (r.status_code, r.text)
    loc = requests.compat.urljoin(URL, r.headers["Location"])
    r = s.put(loc + ("&" if "?" in loc else "?") + f"digest=sha256:{hexd}", data=data,
              headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert r.status_code == 201, (r.status_code, r.text)
    assert s.head(f"{URL}/v2/{repo}/blobs/sha256:{hexd}", timeout=10).status_code == 200
    return hexd


def rados_objects(grep: str) -> list[str]:
    r = ssh(RGW).run(cmd("rados --pool default.rgw.buckets.data ls | grep -F {g} || true", g=grep), read=True)
    return r.stdout.split()


def container_state() -> str:
    r = ssh(REGISTRY).run(cmd("docker inspect --format {f} registry", f="{{.Id}} {{.State.StartedAt}}"),
                          read=True, check=False)
    return r.stdout.strip() if r.exit_code == 0 else ""


def rgw_secrets() -> list[str]:
    r = ssh(RGW).run(cmd("radosgw-admin user info --uid={u}", u=LAB_PARAMS["uid"]), read=True, no_log=True)
    info = json.loads(r.stdout)
    return [k["secret_key"] for k in info.get("keys", [])] + [k["secret_key"] for k in info.get("swift_keys", [])]


def assert_no_secrets(out_path, state_dir):
    raw = pathlib.Path(out_path).read_text()
    leaks = [password(state_dir), *rgw_secrets()]
    ht = ssh(REGISTRY).read_file("/opt/k8s/registry/auth/htpasswd") or b""
    leaks += [line.split(":", 1)[1] for line in ht.decode().splitlines() if ":" in line]
    sec = pathlib.Path(state_dir) / "secrets"
    leaks += [p.read_text().strip() for p in sec.iterdir() if p.is_file()]
    for key in (pathlib.Path(state_dir) / "certs" / "registry-key.pem", pathlib.Path(state_dir) / "ca" / "ca-key.pem"):
        if key.exists():
            leaks += [l for l in key.read_text().splitlines() if l and not l.startswith("-----")]
    found = [s[:4] + "..." for s in leaks if s and s in raw]
    assert not found, f"secrets in {out_path}: {found}"


def verdict_ok(nb) -> str:
    text = outputs_text(nb)
    assert "VERDICT 04-registry: PASS" in text, text[-2000:]
    return text


@pytest.fixture(scope="module")
def ready(lab, state_dir, tmp_path_factory):
    """RGW and its account (sections 1-2) and our certificate (section 3), as the user would have them."""
    from conftest import execute
    d = tmp_path_factory.mktemp("prereq")
    for name, params in (("01-rgw", {}), ("02-accounts", {"s3_keys": True}), ("03-certs", {"registry_host": REGISTRY})):
        execute(name, d / f"{name}.ipynb", **params)
    return state_dir


# ------------------------------------------------------------------ lab: backends
@pytest.mark.lab
def test_filesystem(ready, nb_run):
    nb, out, _ = nb_run("04-registry", storage="filesystem")
    verdict_ok(nb)
    hexd = push_blob(ready)
    r = ssh(REGISTRY).run(cmd("find /opt/k8s/registry/data/docker/registry/v2/blobs -path {p}", p=f"*{hexd}*"),
                          read=True)
    assert hexd in r.stdout
    assert_no_secrets(out, ready)


@pytest.mark.lab
def test_s3(ready, nb_run):
    nb, out, _ = nb_run("04-registry", storage="s3", container="registry-s3")
    text = verdict_ok(nb)
    assert "registry-s3" in text
    hexd = push_blob(ready)
    objs = rados_objects(hexd)
    assert any("docker/registry/v2/blobs/sha256/" in o for o in objs), objs
    # the registry process has no AWS_CA_BUNDLE (the s3 driver would have panicked)
    env = ssh(REGISTRY).run(cmd("docker exec registry env"), read=True).stdout
    assert "AWS_CA_BUNDLE" not in env
    assert_no_secrets(out, ready)


def unit_pid(h) -> str:
    return h.run(cmd("systemctl show -p MainPID --value docker-registry"), read=True).stdout.strip()


@pytest.mark.lab
def test_systemd_runtime_is_debians_package_and_unit(ready, nb_run):
    """runtime=systemd on a systemd host: docker-registry from apt, its unit (ours: no AWS_CA_BUNDLE)
    enabled and active as user docker-registry, TLS + auth answering; a re-run changes nothing."""
    nb, out, _ = nb_run("04-registry", runtime="systemd", storage="filesystem")
    text = verdict_ok(nb)
    assert container_state() == ""  # the docker container made way
    h = ssh(REGISTRY)
    assert h.run(cmd("dpkg -s docker-registry"), read=True).exit_code == 0
    assert h.run(cmd("systemctl is-enabled docker-registry"), read=True, check=False).stdout.strip() == "enabled"
    pid = unit_pid(h)
    assert pid.isdigit() and pid != "0"
    assert h.run(cmd("ps -o user= -p {p}", p=pid), read=True).stdout.strip() == "docker-registry"
    assert "AWS_CA_BUNDLE" not in h.run(cmd("tr '\\0' '\\n' < /proc/{p}/environ", p=pid), read=True).stdout
    # TLS + auth, as clients see it
    assert sess(ready, pw="wrong-password").get(f"{URL}/v2/", timeout=10).status_code == 401
    assert sess(ready).get(f"{URL}/v2/", timeout=10).status_code == 200
    nb2, _, _ = nb_run("04-registry", runtime="systemd", storage="filesystem")
    assert "0 changed, 0 would change" in verdict_ok(nb2)
    assert unit_pid(h) == pid
    assert_no_secrets(out, ready)


@pytest.mark.lab
def test_swift_default_and_idempotent(ready, nb_run):
    nb, out, _ = nb_run("04-registry")  # defaults: swift, docker
    verdict_ok(nb)
    h = ssh(REGISTRY)
    assert not h.test(cmd("systemctl is-active --quiet docker-registry"))  # the unit made way for the container
    hexd = push_blob(ready)
    objs = rados_objects(hexd)
    assert any("_files/docker/registry/v2/blobs/sha256/" in o for o in objs), objs  # as in the document
    before = container_state()
    nb2, out2, _ = nb_run("04-registry")
    assert "0 changed, 0 would change" in verdict_ok(nb2)
    assert container_state() == before
    for p, mode in (("/opt/k8s/registry/config.yml", "600"), ("/opt/k8s/registry/auth/htpasswd", "600"),
                    ("/opt/k8s/registry/certs/registry-key.pem", "600")):
        assert h.run(cmd("stat -c %a {p}", p=p), read=True).stdout.strip() == mode
    assert_no_secrets(out, ready)
    assert_no_secrets(out2, ready)


@pytest.mark.lab
def test_new_htpasswd_user_changes_only_htpasswd(ready, nb_run):
    before = container_state()
    nb, out, _ = nb_run("04-registry", htpasswd_users="bob")
    text = verdict_ok(nb)
    assert "steps: 4 ok, 1 changed" in text or ("1 changed" in text), text[-600:]
    assert container_state() == before  # no restart: the registry re-reads htpasswd
    bob = (pathlib.Path(ready) / "secrets" / "htpasswd_password@bob").read_text().strip()
    deadline = time.time() + 10
    while sess(ready, "bob", bob).get(f"{URL}/v2/", timeout=5).status_code != 200:
        assert time.time() < deadline, "bob cannot log in"
        time.sleep(0.3)
    assert_no_secrets(out, ready)
    # removing him: 401 again, still no restart
    nb_run("04-registry", remove_users="bob")
    deadline = time.time() + 10
    while sess(ready, "bob", bob).get(f"{URL}/v2/", timeout=5).status_code != 401:
        assert time.time() < deadline, "bob can still log in"
        time.sleep(0.3)
    assert container_state() == before


@pytest.mark.lab
def test_deleted_htpasswd_is_restored(ready, nb_run):
    ssh(REGISTRY).run(cmd("rm -f /opt/k8s/registry/auth/htpasswd"))
    nb, _, _ = nb_run("04-registry")
    verdict_ok(nb)
    assert ssh(REGISTRY).exists("/opt/k8s/registry/auth/htpasswd")


# ------------------------------------------------------------------ lab: bad input, nothing changes
@pytest.mark.lab
@pytest.mark.parametrize("params, expect", [
    ({"swift_subuser": "demo:nosuch"}, "demo:nosuch"),
    ({"registry_port": 22}, f"registry_port: 22 is in use on {REGISTRY} by sshd"),
    ({"remote_dir": ""}, "remote_dir: '' must be an absolute directory"),
    ({"registry_version": 3, "image": "registry:3"}, "registry 3"),
    ({"storage": "ceph"}, "storage: 'ceph' is not one of"),
])
def test_bad_input_changes_nothing(ready, nb_run, params, expect):
    before = container_state()
    ht = ssh(REGISTRY).read_file("/opt/k8s/registry/auth/htpasswd")
    nb, out, err = nb_run("04-registry", expect_error=True, **params)
    assert expect in str(err), str(err)
    assert container_state() == before
    assert ssh(REGISTRY).read_file("/opt/k8s/registry/auth/htpasswd") == ht
    assert_no_secrets(out, ready)


@pytest.mark.lab
def test_wrong_swift_key_caught_from_the_registry_host(ready):
    """A bad key (RGW answers 401) is caught by the pre-flight probe, from the registry host."""
    import runbook_lib as rb
    ns = {k: v for k, v in LAB_PARAMS.items()}
    ns.update(dry_run=False, state_dir=str(ready), storage="swift", swift_subuser="demo:swift", registry_host=REGISTRY)
    ns["__annotations__"] = {k: type(v) for k, v in ns.items() if not k.startswith("_")}
    ctx = rb.begin("test", ns)
    problems = registry._storage_probe(ctx, ctx.host(REGISTRY),
                                       {"swift_user": "demo:swift", "swift_key": "not-the-key-0000"})
    assert problems and "RGW refused swift auth" in problems[0] and "401" in problems[0]
    assert registry._storage_probe(ctx, ctx.host(REGISTRY), registry.credentials(ctx)) == []


@pytest.mark.lab
def test_container_of_another_rgw_user_is_refused_before_any_change(ready, nb_run, run_notebook):
    """RGW container names are global: demo owns 'registry', so another uid cannot use it
    (the registry would crash-loop on 'Operation forbidden')."""
    nb_run("04-registry")  # demo's container 'registry' exists
    run_notebook("02-accounts", uid="intruder", swift_subuser="intruder:swift", display_name="other user")
    before = container_state()
    nb, out, err = nb_run("04-registry", expect_error=True, uid="intruder", swift_subuser="intruder:swift")
    assert "container: the Swift container 'registry' on RGW belongs to another RGW user" in str(err), str(err)
    assert container_state() == before
    ssh(RGW).run(cmd("radosgw-admin user rm --uid=intruder --purge-data"))


@pytest.mark.lab
def test_leaves_swift_deployed(ready, run_notebook):
    """Section 5 builds on the default deployment, on the lab's registry host."""
    run_notebook("03-certs")
    nb, _, _ = run_notebook("04-registry")
    text = verdict_ok(nb)
    assert "storage: swift" in text and "runtime: docker" in text


@pytest.mark.lab
def test_host_without_systemd_gets_a_supervised_daemon(lab, run_notebook, tmp_path):
    """A host of the old kind (a container or WSL: no systemd, root login): runtime=systemd runs
    docker-registry serve as a daemon the runbook supervises (pidfile, config hash), restarted on a
    re-run when it died; become: false, as a root login needs."""
    name, addr = "labtest-nosystemd", "198.18.0.44"
    lab.add_host(name, addr, systemd=False)
    try:
        p = dict(registry_host=addr, ssh_user="root", become=False, state_dir=str(tmp_path / "state"))
        run_notebook("03-certs", **p)
        p.update(runtime="systemd", storage="filesystem")
        nb, _, _ = run_notebook("04-registry", **p)
        text = verdict_ok(nb)
        assert "started (no systemd: pidfile)" in text
        h = lab_host(addr, ssh_user="root", become=False)
        assert not h.has_systemd()
        pid = h.run(cmd("cat /run/docker-registry.pid"), read=True).stdout.strip()
        assert h.test(cmd("kill -0 {p}", p=pid))
        assert "0 changed, 0 would change" in verdict_ok(run_notebook("04-registry", **p)[0])
        h.run(cmd("kill {p}; for i in $(seq 50); do kill -0 {p} 2>/dev/null || exit 0; sleep 0.1; done", p=pid))
        text = verdict_ok(run_notebook("04-registry", **p)[0])
        assert "1 changed" in text
        assert h.run(cmd("cat /run/docker-registry.pid"), read=True).stdout.strip() != pid
        h.run(cmd("kill $(cat /run/docker-registry.pid)"), check=False)
    finally:
        lab.remove_host(name)
