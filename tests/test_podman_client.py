"""Issue 18, the client half, on the lab: a registry host with podman and no docker (`pcreg`,
198.18.0.170, Debian's podman 4.3), deployed by 02/03/04 with runtime=podman; a second podman
host as the user's client (`pccli`, 198.18.0.172); and docker from the control node.

- 05-push client=podman on pccli: the CA in /etc/containers/certs.d/HOST:PORT, podman login
  (podman's own auth file), push, pull back, digests equal; a second run changes nothing.
- 05-push client=docker from the control node to the same podman-run registry; then each client
  pulls what the other pushed, by digest (one registry, two engines, the same bytes).
- the client host rebooted: podman's login (on /run) is gone, 05-push logs in again and pushes nothing.
- client=docker on a host that has only podman: refused before anything is written there, with
  the package and the client it does have.
- 07-faq on the podman runtime: the registry's unit made to run the container as an unprivileged
  user (the files it mounts are root's), so it crash-loops and its container is gone most of the
  time: the FAQ names mount-access from the unit's journal, fix=True makes the unit again, and the
  registry answers; a stopped unit is registry-down and started again; and on the podman client,
  a missing CA under /etc/containers/certs.d and a stale login in podman's auth file are named
  and fixed.  (SELinux's :Z cause cannot happen here — no SELinux — and is decided by a pure
  function tested in test_faq.py.)

Own RGW user (pcuser), Swift container (pc-registry) and state dir; never registry1 or uid demo.
Never `lab up`: the lab must be up; the hosts are (re)added (add_host is idempotent).
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import time

import pytest

from conftest import LAB_PARAMS, execute, outputs_text
from helpers import lab_host, lab_ssh, rgw_answers
from runbook_lib import push as P
from runbook_lib.host import cmd

pytestmark = pytest.mark.lab

REG, CLI = ("pcreg", "198.18.0.170"), ("pccli", "198.18.0.172")
PORT = 8000
TARGET = f"{REG[1]}:{PORT}"
UID, CONTAINER = "pcuser", "pc-registry"
PODMAN_IMG, DOCKER_IMG = "podcl/by-podman:v1", "podcl/by-docker:v1"
UNIT = "/etc/systemd/system/container-registry.service"
ROOT_AUTH = "/run/containers/0/auth.json"  # podman's auth file as root (through sudo)
DIGEST = r"sha256:[0-9a-f]{64}"


def notebook(name: str, d: pathlib.Path, expect_error=False, **params) -> tuple[str, pathlib.Path]:
    params = {"registry_host": REG[1], "uid": UID, "state_dir": str(d / "state"), **params}
    out = d / f"{name}-{time.monotonic_ns()}.ipynb"
    return outputs_text(execute(name, out, expect_error=expect_error, **params)[0]), out


def purge():
    lab_ssh(LAB_PARAMS["rgw_host"], f"radosgw-admin bucket rm --bucket={CONTAINER} --purge-objects >/dev/null 2>&1; "
            "true", timeout=120, check=False)


def password(d) -> str:
    return (d / "state" / "secrets" / "registry_password").read_text().strip()


def no_secret(d, *outs):
    pw = password(d)
    forms = [pw, P.auth_b64(LAB_PARAMS["registry_user"], pw)]
    for o in outs:
        assert not any(f in o.read_text() for f in forms), f"a secret is in {o}"
    runs = os.environ.get("RUNBOOK_RUNS_DIR")
    for p in (pathlib.Path(runs).rglob("*") if runs else ()):
        if p.is_file():
            assert not any(f.encode() in p.read_bytes() for f in forms), f"a secret is in {p}"


def digests(text: str) -> dict:
    return {k: re.findall(rf"{k}: ({DIGEST})", text) for k in ("Docker-Content-Digest", "client reported",
                                                                 "pulled back")}


def counts(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("steps:"))


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    from runbook_lib import lab as L
    t0 = time.monotonic()
    for name, addr in (REG, CLI):
        L.add_host(name, addr, role="podman")
    # what an earlier run left: the registry's unit and files, the client's images, CA and login
    lab_ssh(REG[1], f"systemctl disable --now container-registry >/dev/null 2>&1; rm -f {UNIT}; "
            "systemctl daemon-reload; podman rm -f --ignore registry >/dev/null; rm -rf /opt/k8s/registry; true")
    lab_ssh(CLI[1], f"podman rmi -f -a >/dev/null 2>&1; rm -rf /etc/containers/certs.d/* {ROOT_AUTH} "
            "/root/.runbook-registry; true")
    # the stand-in image is made from busybox (05-push's rootfs); Debian's podman host lacks it
    lab_ssh(CLI[1], "command -v busybox >/dev/null || { apt-get update -q >/dev/null && "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null 2>&1; }", timeout=180)
    # ceph1's RGW is shared: another session may be restarting it (seen: 02-accounts refused)
    deadline = time.monotonic() + 60
    while not rgw_answers() and time.monotonic() < deadline:
        time.sleep(1)
    d = tmp_path_factory.mktemp("podcl")
    (d / "state").mkdir(mode=0o700)
    purge()
    text, _ = notebook("02-accounts", d)
    assert "VERDICT 02-accounts: PASS" in text
    text, _ = notebook("03-certs", d)
    assert "VERDICT 03-certs: PASS" in text
    text, _ = notebook("04-registry", d, container=CONTAINER, runtime="podman")
    assert "VERDICT 04-registry: PASS" in text, text[-2500:]
    print(f"\npodman fixture: {time.monotonic() - t0:.1f} s")
    yield d
    local = lab_host("local")
    local.run(cmd("docker logout {t} >/dev/null 2>&1; docker rmi -f {a} >/dev/null 2>&1; rm -rf {c}; true",
                  t=TARGET, a=[f"{TARGET}/{PODMAN_IMG}", f"{TARGET}/{DOCKER_IMG}", DOCKER_IMG],
                  c=f"{P.DOCKER_CERTS}/{TARGET}"), check=False)
    lab_ssh(REG[1], "systemctl disable --now container-registry >/dev/null 2>&1; true", check=False)
    purge()


def test_podman_and_docker_clients_push_pull_and_pull_each_others(pod):
    t0 = time.monotonic()
    text, out1 = notebook("05-push", pod, client="podman", client_host=CLI[1], image_name=PODMAN_IMG)
    assert f"VERDICT 05-push: PASS — pushed {PODMAN_IMG} to {TARGET}, 1 layer in RGW" in text, text[-3000:]
    seen = digests(text)
    assert all(seen.values()) and len({v[0] for v in seen.values()}) == 1, seen
    by_podman = seen["client reported"][0]
    assert "podman push --digestfile" in text and "podman pull" in text and "layers stored: 1 of 1" in text
    # the password went on stdin: the command line (shown, journaled, in ps) has none
    assert f"podman login {TARGET} -u {LAB_PARAMS['registry_user']} --password-stdin" in text
    c = lab_host(CLI[1])
    ca = (pod / "state" / "ca" / "ca.pem").read_bytes()
    assert c.read_file(f"{P.CONTAINERS_CERTS}/{TARGET}/ca.crt") == ca
    pw = password(pod)
    assert P.stored_auth(c.read_file(ROOT_AUTH), TARGET) == P.auth_b64(LAB_PARAMS["registry_user"], pw)

    text, out2 = notebook("05-push", pod, client="podman", client_host=CLI[1], image_name=PODMAN_IMG)
    assert "VERDICT 05-push: PASS" in text and ", 0 changed," in counts(text), counts(text)
    assert "not pushed again" in text and "no new login" in text
    t_podman = time.monotonic() - t0

    text, out3 = notebook("05-push", pod, client="docker", client_host="local", image_name=DOCKER_IMG)
    assert f"VERDICT 05-push: PASS — pushed {DOCKER_IMG} to {TARGET}, 1 layer in RGW" in text, text[-3000:]
    seen = digests(text)
    assert len({v[0] for v in seen.values()}) == 1, seen
    by_docker = seen["client reported"][0]
    no_secret(pod, out1, out2, out3)

    # one registry, two engines: each pulls what the other pushed, and gets the same manifest
    local = lab_host("local")
    r = local.run(cmd("docker pull {r}", r=f"{TARGET}/{PODMAN_IMG}"), timeout=120)
    assert P.parse_pull_digest(r.stdout) == by_podman, r.stdout
    repo = DOCKER_IMG.split(":")[0]
    c.run(cmd("podman pull {r}", r=f"{TARGET}/{repo}@{by_docker}"), timeout=120)  # refused unless it hashes so
    r = c.run(cmd("podman image inspect --format {f} {r}", f="{{json .RepoDigests}}", r=f"{TARGET}/{repo}@{by_docker}"),
              read=True)
    assert f"{TARGET}/{repo}@{by_docker}" in json.loads(r.stdout)
    print(f"\n05-push podman x2 {t_podman:.1f} s, all {time.monotonic() - t0:.1f} s")
    # logout=True: podman logout removes the entry from podman's auth file
    text, _ = notebook("05-push", pod, client="podman", client_host=CLI[1], image_name=PODMAN_IMG, logout=True)
    assert "VERDICT 05-push: PASS" in text and f"podman logout {TARGET}" in text
    assert P.stored_auth(c.read_file(ROOT_AUTH), TARGET) is None


def test_client_reboot_loses_podmans_login_and_05_logs_in_again(pod):
    """podman's root auth file is on /run (a tmpfs): after a reboot of the client the login is gone,
    and 05-push logs in again — and only that: the image and the CA are still there, nothing is pushed."""
    from runbook_lib import lab as L
    notebook("05-push", pod, client="podman", client_host=CLI[1], image_name=PODMAN_IMG)  # stands alone too
    print(f"\nclient reboot: {L.reboot(CLI[0])}")
    assert not lab_host(CLI[1]).exists(ROOT_AUTH)
    text, out = notebook("05-push", pod, client="podman", client_host=CLI[1], image_name=PODMAN_IMG)
    assert "VERDICT 05-push: PASS" in text and ", 1 changed," in counts(text), counts(text)
    assert "Login Succeeded" in text and "not pushed again" in text and "already there: not rebuilt" in text
    assert P.stored_auth(lab_host(CLI[1]).read_file(ROOT_AUTH), TARGET)
    no_secret(pod, out)


def test_docker_client_on_a_podman_host_is_refused_before_any_change(pod):
    c = lab_host(CLI[1])
    assert not c.exists(P.DOCKER_CERTS)
    text, out = notebook("05-push", pod, expect_error=True, client="docker", client_host=CLI[1])
    assert "docker is not installed" in text and "this host has: podman" in text, text[-2000:]
    assert "client=podman" in text and "docker.io" in text and "nothing was changed" in text
    assert not c.exists(P.DOCKER_CERTS), "05-push wrote docker's certs.d on a host without docker"


def test_faq_names_unreadable_mounts_of_a_podman_registry_from_its_journal(pod):
    # the unit as someone hardened it by hand: the container as nobody, the root-only config.yml
    # and key then refuse it -> exits at once, the unit restarts it (and removes it: --new) until it gives up
    lab_ssh(REG[1], f"sed -i 's|--name registry |--name registry --user 65534:65534 |' {UNIT} && grep -q 65534 {UNIT} "
            "&& systemctl daemon-reload && systemctl restart container-registry; sleep 2")
    try:
        text, out1 = notebook("07-faq", pod, expect_error=True, runtime="podman", container=CONTAINER,
                              probe_container="pc-faq-probe", client="podman", client_host=CLI[1])
        assert f"found mount-access on {REG[1]}" in text, text[-4000:]
        assert "permission denied" in text and "container-registry.service" in text, text[-3000:]
        assert ":Z" in text and "never --privileged" in text
        assert "selinux-volume-label on" not in text  # no SELinux here: the label is not the cause
        assert "unexplained" not in text.split("VERDICT 07-faq")[-1]
        text, out2 = notebook("07-faq", pod, runtime="podman", container=CONTAINER, probe_container="pc-faq-probe",
                              client="podman", client_host=CLI[1], fix=True)
        assert f"VERDICT 07-faq: PASS — fixed mount-access on {REG[1]}" in text, text[-3000:]
        r = lab_host(REG[1]).run(cmd("grep -c 65534 {u}; systemctl is-active container-registry; "
                                     "systemctl is-enabled container-registry", u=UNIT), read=True, check=False)
        assert r.stdout.split() == ["0", "active", "enabled"], r.stdout
        no_secret(pod, out1, out2)
    finally:
        lab_ssh(REG[1], f"grep -q 65534 {UNIT} && {{ rm -f {UNIT}; systemctl daemon-reload; }}; true", check=False)


def test_faq_names_a_stopped_podman_unit_and_starts_it(pod):
    """Stopped by hand (its container is then removed: --new): registry-down, from the unit's state."""
    notebook("04-registry", pod, container=CONTAINER, runtime="podman")  # as deployed, whatever ran before
    lab_ssh(REG[1], "systemctl stop container-registry")
    faq = dict(runtime="podman", container=CONTAINER, probe_container="pc-faq-probe")
    text, _ = notebook("07-faq", pod, expect_error=True, **faq)
    assert f"found registry-down on {REG[1]}" in text, text[-3000:]
    # (a stop leaves it "failed": the registry exits 2 on SIGTERM, and the unit passes that on)
    assert "no container named registry; container-registry.service" in text, text[-3000:]
    text, _ = notebook("07-faq", pod, fix=True, **faq)
    assert f"VERDICT 07-faq: PASS — fixed registry-down on {REG[1]}" in text, text[-3000:]
    assert lab_host(REG[1]).test(cmd("systemctl is-active --quiet container-registry"))


def test_faq_says_when_runtime_docker_is_given_for_a_podman_registry(pod):
    """-p runtime forgotten: the FAQ must not start a second registry under docker, but say which
    engine runs it (this host has no docker at all)."""
    notebook("04-registry", pod, container=CONTAINER, runtime="podman")
    text, _ = notebook("07-faq", pod, expect_error=True, container=CONTAINER, probe_container="pc-faq-probe")
    assert f"found registry-down on {REG[1]}" in text and "pass -p runtime podman" in text, text[-3000:]
    assert "not applied" in text


@pytest.mark.parametrize("broken", ["ca", "login"])
def test_faq_on_a_podman_client_ca_and_stale_login(pod, broken):
    """The podman client's own files: its CA under /etc/containers/certs.d (not docker's path), and
    its login in podman's auth file; each named by 07-faq with client=podman and fixed."""
    notebook("04-registry", pod, container=CONTAINER, runtime="podman")
    notebook("05-push", pod, client="podman", client_host=CLI[1], image_name=PODMAN_IMG)  # trusted, logged in
    c = lab_host(CLI[1])
    ca_path = f"{P.CONTAINERS_CERTS}/{TARGET}/ca.crt"
    if broken == "ca":
        c.run(cmd("rm -f {p}", p=ca_path))
        cause = "tls-ca-not-trusted"
    else:
        stale = {"auths": {TARGET: {"auth": base64.b64encode(b"foo:an-old-password").decode()}}}
        c.put_file(ROOT_AUTH, json.dumps(stale), mode=0o600)
        cause = "client-login-stale"
    faq = dict(runtime="podman", container=CONTAINER, probe_container="pc-faq-probe", client="podman",
               client_host=CLI[1])
    text, out1 = notebook("07-faq", pod, expect_error=True, **faq)
    assert f"found {cause} on {CLI[1]}" in text, text[-3000:]
    assert (ca_path if broken == "ca" else ROOT_AUTH) in text
    text, out2 = notebook("07-faq", pod, fix=True, **faq)
    assert f"VERDICT 07-faq: PASS — fixed {cause} on {CLI[1]}" in text, text[-3000:]
    if broken == "ca":
        assert c.read_file(ca_path) == (pod / "state" / "ca" / "ca.pem").read_bytes()
    else:
        pw = password(pod)
        assert P.stored_auth(c.read_file(ROOT_AUTH), TARGET) == P.auth_b64(LAB_PARAMS["registry_user"], pw)
    no_secret(pod, out1, out2)
