"""07-faq against every login and push failure an operator meets (issue 15), each reproduced on the lab.

Hosts of this module's own (never ceph1/registry1): `faqceph` (a Ceph cluster of its own with RGW,
198.18.0.100), `faqreg1` (the registry, swift storage against faqceph, 198.18.0.101) and `faqcli`
(the user's docker client, 198.18.0.102).  Sections 1-4 are deployed once (module fixture) with a
state dir of this module; each test breaks one thing, runs 07-faq with client_host=faqcli, asserts
the cause it names (never "unexplained"), and where fix=True applies the fix, that `docker login`
and `docker push` work on the client afterwards.  A finalizer restores the registry (04-registry),
the client's CA and login after every test, pass or fail.  The hosts are removed at the end."""
from __future__ import annotations

import base64
import datetime as dt
import json
import pathlib
import time

import pytest
import yaml

from runbook_lib import faq
from runbook_lib.host import cmd

from helpers import lab_host
from conftest import execute, outputs_text

CEPH_NAME, CEPH_ADDR = "faqceph", "198.18.0.100"
REG_NAME, REG_ADDR = "faqreg1", "198.18.0.101"
CLI_NAME, CLI_ADDR = "faqcli", "198.18.0.102"
PORT = 8000
ADDR = f"{REG_ADDR}:{PORT}"
UID = "faqa"
PROBE = "faq-causes-probe"
RD = "/opt/k8s/registry"
FULL_RESET = "ceph osd set-nearfull-ratio 0.85; ceph osd set-backfillfull-ratio 0.90; ceph osd set-full-ratio 0.95"

pytestmark = pytest.mark.lab


# ------------------------------------------------------------------ helpers
def ssh(addr: str):
    return lab_host(addr)


def run_nb(d: pathlib.Path, name: str, expect_error=False, **params):
    params = {"rgw_host": CEPH_ADDR, "registry_host": REG_ADDR, "uid": UID, "state_dir": str(d / "state"), **params}
    if name == "07-faq":
        params = {"client_host": CLI_ADDR, "probe_container": PROBE, **params}
    out = d / f"{name}-{time.monotonic_ns()}.ipynb"
    return outputs_text(execute(name, out, expect_error=expect_error, **params)[0]), out


def password(d) -> str:
    return (d / "state" / "secrets" / "registry_password").read_text().strip()


def ca_pem(d) -> bytes:
    return (d / "state" / "ca" / "ca.pem").read_bytes()


def trust_and_login(d, addr=ADDR):
    """The client as 05-push leaves it: the CA at certs.d/ADDR, logged in."""
    c = ssh(CLI_ADDR)
    c.put_file(f"/etc/docker/certs.d/{addr}/ca.crt", ca_pem(d), mode=0o644)
    c.run(cmd("docker login {t} -u foo --password-stdin", t=addr), stdin=password(d) + "\n", timeout=60)


def login_and_push(d, addr=ADDR) -> str:
    """docker login + docker push of a tiny image from the client: the push's output (asserts success)."""
    c = ssh(CLI_ADDR)
    c.run(cmd("docker login {t} -u foo --password-stdin", t=addr), stdin=password(d) + "\n", timeout=60)
    ref = f"{addr}/faq/tiny:{time.time_ns()}"
    script = ("set -e; t=$(mktemp -d); echo {s} > $t/f; tar -C $t -cf $t/l.tar f; docker import $t/l.tar {r} >/dev/null; "
              "rm -rf $t; docker push {r}; docker rmi {r} >/dev/null")
    r = c.run(cmd("sh -c " + "{x}", x=script.replace("{s}", f"faq-{time.time_ns()}").replace("{r}", ref)),
              timeout=180, check=False)
    assert r.exit_code == 0, f"push {ref} failed: {r.stdout[-800:]} {r.stderr[-800:]}"
    assert "digest: sha256:" in r.stdout
    return r.stdout


def reg_config(h) -> dict:
    return yaml.safe_load(h.read_file(f"{RD}/config.yml"))


def put_reg_config(h, cfg: dict, restart=True):
    h.put_file(f"{RD}/config.yml", yaml.safe_dump(cfg, sort_keys=False), mode=0o600, secret=True)
    if restart:
        h.run(cmd("docker restart registry"))
        time.sleep(1.5)


def cert_files(d, sans, not_before, not_after) -> tuple[bytes, bytes]:
    """A server certificate signed by the state dir's CA, with the SANs and validity given."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from runbook_lib import certs
    ca = x509.load_pem_x509_certificate(ca_pem(d))
    ca_key = serialization.load_pem_private_key((d / "state" / "ca" / "ca-key.pem").read_bytes(), None)
    key = certs.new_key()
    c = (x509.CertificateBuilder().subject_name(certs.subject_of()).issuer_name(ca.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.SubjectAlternativeName(certs.san_entries(sans)), critical=False)
         .sign(ca_key, hashes.SHA256()))
    return c.public_bytes(serialization.Encoding.PEM), certs.key_pem(key)


def put_cert(h, pem: bytes, key: bytes):
    h.put_file(f"{RD}/certs/registry.pem", pem, mode=0o644)
    h.put_file(f"{RD}/certs/registry-key.pem", key, mode=0o600, secret=True)
    h.run(cmd("docker restart registry"))
    time.sleep(1.5)


def assert_named(text: str, cause: str, where: str):
    assert f"found {cause} on {where}" in text or f"fixed {cause} on {where}" in text, text[-4000:]
    assert "unexplained" not in text.split("VERDICT 07-faq")[-1], text[-3000:]


def assert_no_secret(d, *paths, extra=()):
    leaks = [password(d)] + [s for s in extra if s]
    for p in paths:
        raw = pathlib.Path(p).read_text()
        found = [s[:3] + "..." for s in leaks if s in raw]
        assert not found, f"secret in {p}: {found}"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def causes(tmp_path_factory):
    """faqceph (RGW, account faqa), faqreg1 (registry, swift), faqcli (docker client, CA trusted,
    logged in).  Re-added if a lab restart took them (add_host is idempotent)."""
    from runbook_lib import lab
    d = tmp_path_factory.mktemp("faqcauses")
    try:
        lab.add_ceph_host(CEPH_NAME, CEPH_ADDR)
        ssh(CEPH_ADDR).run(cmd(FULL_RESET))  # a leftover host of an interrupted run may still be full
        lab.add_host(REG_NAME, REG_ADDR, docker=True)
        lab.add_host(CLI_NAME, CLI_ADDR, docker=True)
        for name in ("01-rgw", "02-accounts", "03-certs", "04-registry"):
            run_nb(d, name)
        trust_and_login(d)
        yield d
    finally:
        for n in (CLI_NAME, REG_NAME, CEPH_NAME):
            try:
                lab.remove_host(n)
            except Exception:  # noqa: BLE001 - best effort; the next `lab up` clears leftovers
                pass


@pytest.fixture
def case(causes, monkeypatch):
    """One broken thing per test; afterwards the registry, the client and the account as deployed."""
    yield causes
    monkeypatch.delenv("REGISTRY_PASSWORD", raising=False)
    h = ssh(REG_ADDR)
    h.run(cmd("test -d {p} && rmdir {p}; true", p=f"{RD}/auth/htpasswd"))
    # the full ratios first: radosgw-admin blocks while the OSD is full
    ssh(CEPH_ADDR).run(cmd(FULL_RESET + "; timeout 60 radosgw-admin user enable --uid={u} >/dev/null; "
                           "timeout 60 radosgw-admin quota disable --quota-scope=user --uid={u}", u=UID), check=False)
    # the container re-created: 04-registry alone keeps a running container whose label matches, even when
    # its config.yml was edited by hand
    h.run(cmd("docker rm -f registry"), check=False)
    run_nb(causes, "04-registry")  # config.yml, certificate, htpasswd and container as the runbook renders them
    c = ssh(CLI_ADDR)
    c.run(cmd("rm -rf /etc/docker/certs.d/*/ /root/.docker/config.json"))
    trust_and_login(causes)


# ------------------------------------------------------------------ healthy
def test_healthy_no_problem_found(causes):
    text, out = run_nb(causes, "07-faq")
    assert "VERDICT 07-faq: PASS — no problem found" in text, text[-3000:]
    for c in ("htpasswd-wrong-password", "tls-ca-not-trusted", "listening-elsewhere", "osd-full"):
        assert c in text.split("checked:")[-1]


# ------------------------------------------------------------------ 401
def test_401_wrong_password_from_the_environment(case, monkeypatch):
    """The issue's case: REGISTRY_PASSWORD set to another password than the deployed one."""
    monkeypatch.setenv("REGISTRY_PASSWORD", "not-the-deployed-password-42")
    text, out = run_nb(case, "07-faq", expect_error=True, fix=True)
    assert_named(text, "htpasswd-wrong-password", REG_ADDR)
    assert "what to do: 1. htpasswd-wrong-password" in text
    assert "REGISTRY_PASSWORD is set and differs" in text and "unset REGISTRY_PASSWORD" in text
    assert "not-the-deployed-password-42" not in out.read_text()
    assert "$2y$" not in text  # the hash is never shown
    assert "not fixable here" in text  # a password change is never applied by fix=True
    monkeypatch.delenv("REGISTRY_PASSWORD")
    text, _ = run_nb(case, "07-faq")
    assert "VERDICT 07-faq: PASS — no problem found" in text, text[-3000:]


def test_401_user_missing_then_added(case):
    from passlib.hash import bcrypt
    h = ssh(REG_ADDR)
    h.put_file(f"{RD}/auth/htpasswd", f"alice:{bcrypt.using(rounds=5, ident='2y').hash('alice-pass-1')}\n",
               mode=0o600, secret=True)
    text, out1 = run_nb(case, "07-faq", expect_error=True, symptom="unauthorized: authentication required")
    assert_named(text, "htpasswd-user-missing", REG_ADDR)
    assert "no line for 'foo' (users: alice)" in text and "symptom: 401" in text
    text, out2 = run_nb(case, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed htpasswd-user-missing" in text, text[-3000:]
    ht = h.read_file(f"{RD}/auth/htpasswd").decode()
    assert ht.startswith("alice:") and "\nfoo:" in ht  # the other user kept
    login_and_push(case)
    assert_no_secret(case, out1, out2)


def test_htpasswd_missing_at_start_registry_provisions_its_own(case):
    """Measured: registry 2.8.2 started without htpasswd writes one with a user `docker` and
    prints that user's password in its log; foo then gets 401."""
    h = ssh(REG_ADDR)
    h.run(cmd("rm -f {p} && docker restart registry", p=f"{RD}/auth/htpasswd"))
    time.sleep(2)
    log = h.run(cmd("docker logs registry 2>&1 | grep -F {p} | tail -1", p=faq.PROVISIONED_LOG), read=True,
                no_log=True).stdout
    provisioned = log.split("password=")[1].split()[0].strip('"')
    text, out1 = run_nb(case, "07-faq", expect_error=True)
    assert_named(text, "htpasswd-missing", REG_ADDR)
    assert "provisioning with default user" in text and "user 'docker'" in text
    text, out2 = run_nb(case, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed htpasswd-missing" in text, text[-3000:]
    users = [x.split(":")[0] for x in h.read_file(f"{RD}/auth/htpasswd").decode().splitlines()]
    assert users == ["foo"]  # the provisioned user (password in the log) dropped
    login_and_push(case)
    assert_no_secret(case, out1, out2, extra=[provisioned])


def test_htpasswd_a_directory_gives_400(case):
    """Measured: with htpasswd missing or a directory while it runs, 2.8.2 answers 400 to credentials."""
    h = ssh(REG_ADDR)
    h.run(cmd("rm -f {p} && mkdir {p}", p=f"{RD}/auth/htpasswd"))
    text, _ = run_nb(case, "07-faq", expect_error=True)
    assert_named(text, "htpasswd-missing", REG_ADDR)
    assert "400 with" in text and "directory" in text
    text, _ = run_nb(case, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed htpasswd-missing" in text, text[-3000:]
    login_and_push(case)


def test_client_stored_login_stale(case):
    c = ssh(CLI_ADDR)
    stale = base64.b64encode(b"foo:an-old-password-9").decode()
    c.put_file("/root/.docker/config.json", json.dumps({"auths": {ADDR: {"auth": stale}}}), mode=0o600, secret=True)
    r = c.run(cmd("docker push {r}", r=f"{ADDR}/faq/none:1"), check=False, timeout=60)
    symptom = (r.stdout + r.stderr).strip().splitlines()[-1]
    text, out1 = run_nb(case, "07-faq", expect_error=True, symptom=symptom)
    assert_named(text, "client-login-stale", CLI_ADDR)
    assert "as 'foo' whose base64 user:password is not the runbook's" in text
    assert stale not in out1.read_text()
    text, out2 = run_nb(case, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed client-login-stale" in text, text[-3000:]
    login_and_push(case)
    assert_no_secret(case, out1, out2)


# ------------------------------------------------------------------ x509
def test_ca_trusted_for_the_ip_but_the_client_uses_the_hostname(case):
    addr = f"{REG_NAME}:{PORT}"  # faqcli's /etc/hosts names faqreg1; the certificate names it too
    c = ssh(CLI_ADDR)
    r = c.run(cmd("docker login {t} -u foo --password-stdin", t=addr), stdin=password(case) + "\n", check=False,
              timeout=60)
    assert r.exit_code != 0 and "x509" in r.stdout + r.stderr
    text, _ = run_nb(case, "07-faq", expect_error=True, symptom=(r.stdout + r.stderr).strip().splitlines()[-1])
    assert_named(text, "tls-ca-not-trusted", CLI_ADDR)
    assert f"/etc/docker/certs.d/{addr}/ca.crt on {CLI_ADDR}: absent" in text
    assert f"has {ADDR} for the same registry" in text
    text, _ = run_nb(case, "07-faq", fix=True, registry_address=addr)
    assert "VERDICT 07-faq: PASS — fixed tls-ca-not-trusted" in text, text[-3000:]
    login_and_push(case, addr)


def test_certificate_missing_the_address_the_client_uses(case):
    now = dt.datetime.now(dt.timezone.utc)
    put_cert(ssh(REG_ADDR), *cert_files(case, [REG_NAME], now - dt.timedelta(hours=1), now + dt.timedelta(days=30)))
    text, _ = run_nb(case, "07-faq", expect_error=True)
    assert_named(text, "tls-name-missing", REG_ADDR)
    assert f"names {REG_NAME}; the client uses {REG_ADDR}" in text
    text, _ = run_nb(case, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed tls-name-missing" in text, text[-3000:]
    login_and_push(case)


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_certificate_expired_or_not_yet_valid(case, when):
    now = dt.datetime.now(dt.timezone.utc)
    nb, na = ((now - dt.timedelta(days=60), now - dt.timedelta(days=1)) if when == "expired" else
              (now + dt.timedelta(days=1), now + dt.timedelta(days=60)))
    put_cert(ssh(REG_ADDR), *cert_files(case, [REG_ADDR, REG_NAME], nb, na))
    c = ssh(CLI_ADDR)
    r = c.run(cmd("docker login {t} -u foo --password-stdin", t=ADDR), stdin=password(case) + "\n", check=False,
              timeout=60)
    assert "certificate has expired or is not yet valid" in r.stdout + r.stderr
    text, _ = run_nb(case, "07-faq", expect_error=True)
    assert_named(text, "tls-expired", REG_ADDR)
    assert ("expired on" if when == "expired" else "not valid before") in text
    text, _ = run_nb(case, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed tls-expired" in text, text[-3000:]
    login_and_push(case)


def test_registry_speaks_plain_http(case):
    h = ssh(REG_ADDR)
    cfg = reg_config(h)
    cfg["http"].pop("tls")
    put_reg_config(h, cfg)
    r = ssh(CLI_ADDR).run(cmd("docker login {t} -u foo --password-stdin", t=ADDR), stdin=password(case) + "\n",
                          check=False, timeout=60)
    assert "server gave HTTP response to HTTPS client" in r.stdout + r.stderr
    text, _ = run_nb(case, "07-faq", expect_error=True)
    assert_named(text, "registry-speaks-http", REG_ADDR)
    text, _ = run_nb(case, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed registry-speaks-http" in text, text[-3000:]
    login_and_push(case)


def test_client_speaks_http_to_the_https_port(case):
    r = ssh(CLI_ADDR).run(cmd("curl -s {u}", u=f"http://{ADDR}/v2/"), read=True, check=False)
    assert "Client sent an HTTP request to an HTTPS server" in r.stdout
    text, _ = run_nb(case, "07-faq", expect_error=True, fix=True, symptom=r.stdout.strip())
    assert_named(text, "client-speaks-http", CLI_ADDR)
    assert "HTTP 400" in text and f"curl --cacert <state_dir>/ca/ca.pem https://{ADDR}/v2/" in text


# ------------------------------------------------------------------ connection refused
def test_registry_stopped(case):
    ssh(REG_ADDR).run(cmd("docker stop registry"))
    text, _ = run_nb(case, "07-faq", expect_error=True, symptom="dial tcp 198.18.0.101:8000: connect: connection refused")
    assert_named(text, "registry-down", REG_ADDR)
    text, _ = run_nb(case, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed registry-down" in text, text[-3000:]
    login_and_push(case)


def test_registry_on_another_port(case):
    h = ssh(REG_ADDR)
    cfg = reg_config(h)
    cfg["http"]["addr"] = "0.0.0.0:5000"
    put_reg_config(h, cfg)
    text, _ = run_nb(case, "07-faq", expect_error=True, fix=True)
    assert_named(text, "wrong-port", REG_ADDR)
    assert "listens on port 5000" in text and "not fixable here" in text
    assert "papermill notebooks/04-registry.ipynb" in text


def test_registry_listening_on_another_address_only(case):
    h = ssh(REG_ADDR)
    cfg = reg_config(h)
    cfg["http"]["addr"] = f"127.0.0.1:{PORT}"
    put_reg_config(h, cfg)
    text, _ = run_nb(case, "07-faq", expect_error=True)
    assert_named(text, "listening-elsewhere", REG_ADDR)
    assert f"127.0.0.1:{PORT}" in text
    text, _ = run_nb(case, "07-faq", fix=True)
    assert "VERDICT 07-faq: PASS — fixed listening-elsewhere" in text, text[-3000:]
    login_and_push(case)


# ------------------------------------------------------------------ 5xx on push (faqceph: this module's own cluster)
def test_s3_bucket_missing(case):
    """The registry on the s3 driver (RGW's S3 API, a bucket of its own); the bucket deleted."""
    bucket = "faq-s3-bucket"
    run_nb(case, "04-registry", storage="s3", container=bucket)
    login_and_push(case)
    ssh(CEPH_ADDR).run(cmd("radosgw-admin bucket rm --bucket={b} --purge-objects", b=bucket))
    text, _ = run_nb(case, "07-faq", expect_error=True, storage="s3", container=bucket)
    assert_named(text, "storage-container-missing", REG_ADDR)
    assert f"S3 HEAD http://{CEPH_ADDR}:7480/{bucket}: HTTP 404" in text
    text, _ = run_nb(case, "07-faq", fix=True, storage="s3", container=bucket)
    assert "VERDICT 07-faq: PASS — fixed storage-container-missing" in text, text[-3000:]
    login_and_push(case)


def test_rgw_user_suspended(case):
    ssh(CEPH_ADDR).run(cmd("radosgw-admin user suspend --uid={u}", u=UID), no_log=True)
    text, _ = run_nb(case, "07-faq", expect_error=True, fix=True)
    assert_named(text, "rgw-user-suspended", CEPH_ADDR)
    assert f"radosgw-admin user enable --uid={UID}" in text and "not fixable here" in text


def test_rgw_user_quota_full(case):
    login_and_push(case)  # some objects to count
    ssh(CEPH_ADDR).run(cmd("radosgw-admin quota set --quota-scope=user --uid={u} --max-objects=2 && "
                           "radosgw-admin quota enable --quota-scope=user --uid={u}", u=UID))
    text, _ = run_nb(case, "07-faq", expect_error=True, symptom="received unexpected HTTP status: 500 Internal Server Error")
    assert_named(text, "rgw-quota-exceeded", CEPH_ADDR)
    assert f"user quota of {UID}:" in text and "of max 2 objects" in text
    assert "symptom: 5xx" in text and "quota set --quota-scope=user" in text


def test_osd_full_health_err(case):
    ssh(CEPH_ADDR).run(cmd("ceph osd set-nearfull-ratio 0.000001 && ceph osd set-backfillfull-ratio 0.000002 && "
                           "ceph osd set-full-ratio 0.000003"))  # below what a 4 GiB memstore OSD holds: full
    h = ssh(CEPH_ADDR)
    deadline = time.monotonic() + 60
    while "OSD_FULL" not in h.run(cmd("ceph health detail"), read=True, check=False).stdout:
        assert time.monotonic() < deadline, "the OSD did not turn full"
        time.sleep(1)
    text, _ = run_nb(case, "07-faq", expect_error=True)
    assert_named(text, "osd-full", CEPH_ADDR)
    assert "HEALTH_ERR" in text and "osd.0" in text and "% used" in text
