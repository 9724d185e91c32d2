"""Issue 18, the runtime half: the registry on a host with podman and NO docker (`runtime=podman`).

Pure functions first (image names, the SELinux decision, the runtime pre-flight, the unit and
Quadlet renderings, the GC commands), then the lab: pod1 (198.18.0.160) is a Debian 12 host with
Debian's podman 4.3.1, systemd and no docker; its registry stores in its own Swift container
(`pod-registry`) of its own RGW user (`poduser`), with its own state dir, so nothing here touches
another deployment's blobs.  02/03/04 deploy it with papermill; then: a second run changes nothing,
pre-flight refuses runtime=docker there, docker on the control node logs in/pushes/pulls (05-push),
a reboot brings the registry back by its unit, and GC (both modes) frees space with the tagged
image intact.  Never `lab up`: the lab must be up; pod1 is (re)added (add_host is idempotent).
"""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import requests

from conftest import LAB_PARAMS, NOTEBOOKS, execute, outputs_text
from helpers import lab_host, lab_ssh, rgw_answers
from runbook_lib import operations as ops, params as P, registry

NAME, ADDR, PORT = "pod1", "198.18.0.160", 8000
UID, CONTAINER = "poduser", "pod-registry"
URL = f"https://{ADDR}:{PORT}"
MT = "application/vnd.oci.image.manifest.v1+json"
MiB = 1 << 20
RESET = (f"systemctl disable --now {registry.PODMAN_UNIT} >/dev/null 2>&1; podman rm -f --ignore registry >/dev/null; "
         f"rm -f {registry.PODMAN_UNIT_PATH} {registry.QUADLET_PATH}; systemctl daemon-reload; "
         "rm -rf /opt/k8s/registry; true")


# ---------------------------------------------------------------------------- pure functions
def _ctx(**over):
    base = dict(remote_dir="/opt/k8s/registry", storage="swift", image="registry:2", params={"registry_version": 2})
    return SimpleNamespace(**{**base, **over})


@pytest.mark.parametrize("image, full", [
    ("registry:2", "docker.io/library/registry:2"),
    ("registry", "docker.io/library/registry"),
    ("prom/node-exporter:v0.16.0", "docker.io/prom/node-exporter:v0.16.0"),
    ("docker.io/library/registry:2", "docker.io/library/registry:2"),
    ("quay.io/x/registry:2", "quay.io/x/registry:2"),
    ("localhost/registry:2", "localhost/registry:2"),
    ("reg.example:5000/registry:2", "reg.example:5000/registry:2"),
])
def test_image_is_fully_qualified_for_podman(image, full):
    assert registry.full_image(image) == full


@pytest.mark.parametrize("getenforce, label", [
    ("Enforcing\n", ":Z"), ("Permissive", ":Z"), ("Disabled", ""), ("", ""), (None, ""),
])
def test_selinux_decides_the_volume_label(getenforce, label):
    assert registry.volume_label(getenforce) == label


def test_selinux_mount_problem_names_the_unlabelled_mounts():
    vols = ["/opt/k8s/registry/auth:/auth", "/opt/k8s/registry/certs:/certs:Z", "/x:/y:ro,z"]
    p = registry.selinux_mount_problem("Enforcing", vols)
    assert p and "/opt/k8s/registry/auth:/auth" in p and "/certs" not in p and "/x:/y" not in p and ":Z" in p
    assert registry.selinux_mount_problem("Disabled", vols) is None
    assert registry.selinux_mount_problem(None, vols) is None
    assert registry.selinux_mount_problem("Enforcing", vols[1:]) is None


def test_container_and_quadlet_carry_the_label_not_privileged():
    ctx = _ctx()
    argv = registry.podman_create_argv(ctx, "d" * 64, ":Z")
    vols = [argv[i + 1] for i, w in enumerate(argv) if w == "-v"]
    assert vols == ["/opt/k8s/registry/auth:/auth:Z", "/opt/k8s/registry/certs:/certs:Z",
                    "/opt/k8s/registry/config.yml:/etc/docker/registry/config.yml:Z"]
    assert "--privileged" not in argv and argv[-1] == "docker.io/library/registry:2"
    assert argv[:4] == ["podman", "create", "--name", "registry"] and f"{registry.LABEL}={'d' * 64}" in argv
    q = registry.render_quadlet(_ctx(storage="filesystem"), "d" * 64, ":Z")
    assert "ContainerName=registry\n" in q and "Image=docker.io/library/registry:2\n" in q
    assert "Network=host\n" in q and f"Label={registry.LABEL}={'d' * 64}\n" in q
    assert "Volume=/opt/k8s/registry/data:/var/lib/registry:Z\n" in q and "[Install]" in q
    assert "/opt/k8s/registry/auth:/auth" in registry.podman_create_argv(ctx, "d" * 64, "")  # no SELinux: no option


def test_generated_unit_counts_the_registry_stop_codes_as_success():
    gen = "# container-registry.service\n[Unit]\nDescription=x\n\n[Service]\nRestart=always\nExecStart=/usr/bin/podman run\n"
    unit = registry.with_stop_status(gen)
    service = unit.split("[Service]\n", 1)[1]
    assert service.startswith(registry.STOP_EXIT_STATUS + "\n") and "ExecStart=" in service
    assert registry.with_stop_status(unit) == unit  # once
    with pytest.raises(ValueError):
        registry.with_stop_status("[Unit]\n")


def test_quadlet_from_podman_4_4():
    assert [registry.uses_quadlet(registry.podman_version(v)) for v in ("4.3.1", "4.4.0", "5.2.2", "", "3.4")] \
        == [False, True, True, False, False]


PODMAN_HOST = {"docker": None, "podman": "4.3.1", "systemd": True, "pkg": "apt-get", "selinux": None}
DOCKER_HOST = {"docker": "20.10.24", "podman": None, "systemd": True, "pkg": "apt-get", "selinux": None}


@pytest.mark.parametrize("runtime, found, says", [
    ("docker", PODMAN_HOST, ["docker is not installed on h1", "podman 4.3.1, systemd", "apt-get install docker.io",
                             "or use runtime=podman"]),
    ("podman", DOCKER_HOST, ["podman is not installed on h1", "apt-get install podman", "or use runtime=docker"]),
    ("podman", {**DOCKER_HOST, "pkg": "dnf", "docker": None}, ["dnf install podman"]),
    ("podman", {**DOCKER_HOST, "pkg": None, "docker": None}, ["apt-get install podman (Debian/Ubuntu) or dnf install "
                                                              "podman (RHEL/Rocky/Alma)", "no container engine"]),
    ("docker", {**DOCKER_HOST, "docker": ""}, ["docker does not answer on h1"]),
    ("podman", {**PODMAN_HOST, "systemd": False}, ["needs systemd"]),
])
def test_preflight_refuses_a_runtime_the_host_lacks(runtime, found, says):
    p = registry.runtime_problem(runtime, found, "h1")
    assert p and p.startswith("runtime: "), p
    for s in says:
        assert s in p, (s, p)


def test_preflight_accepts_the_runtime_the_host_has():
    assert registry.runtime_problem("podman", PODMAN_HOST, "h1") is None
    assert registry.runtime_problem("docker", DOCKER_HOST, "h1") is None
    assert registry.runtime_problem("systemd", PODMAN_HOST, "h1") is None  # checked elsewhere
    assert registry.describe_runtimes({**PODMAN_HOST, "selinux": "Enforcing"}) \
        == "podman 4.3.1, systemd, SELinux Enforcing"


def test_runtime_parameter_takes_podman():
    assert P._value_problem("runtime", "podman") is None
    assert "docker, podman, systemd" in P._value_problem("runtime", "rkt")


UNIT = """\
[Service]
ExecStart=/usr/bin/podman run \\
\t--cidfile=%t/%n.ctr-id \\
\t--rm \\
\t-d \\
\t--name registry \\
\t--network host \\
\t--label runbook.config-sha256=abc \\
\t-v /opt/k8s/registry/auth:/auth:Z \\
\t-v /opt/k8s/registry/config.yml:/etc/docker/registry/config.yml:Z docker.io/library/registry:2
ExecStop=/usr/bin/podman stop \\
\t--ignore -t 10
"""


def test_unit_volumes_keep_their_options():
    assert registry.unit_volumes(UNIT) == ["/opt/k8s/registry/auth:/auth:Z",
                                           "/opt/k8s/registry/config.yml:/etc/docker/registry/config.yml:Z"]
    q = registry.render_quadlet(_ctx(), "d" * 64, ":Z")
    assert registry.unit_volumes(q)[0] == "/opt/k8s/registry/auth:/auth:Z"
    assert registry.selinux_mount_problem("Enforcing", registry.unit_volumes(UNIT)) is None


def test_gc_commands_for_podman():
    image, mounts = ops.parse_podman_unit(UNIT)
    assert image == "docker.io/library/registry:2"
    assert mounts == [{"Source": "/opt/k8s/registry/auth", "Destination": "/auth"},
                      {"Source": "/opt/k8s/registry/config.yml", "Destination": "/etc/docker/registry/config.yml"}]
    dep = ops.Deployment([ADDR], "podman", True, ops.DEFAULT_CONFIG, "/opt/k8s/registry/config.yml", "swift",
                         "b", container="registry", image_id="sha256:1d", mounts=mounts, volume_label=":Z")
    assert ops.gc_argv(dep, dry_run=True, delete_untagged=False, stopped=False) == [
        "podman", "exec", "registry", "registry", "garbage-collect", "--dry-run", ops.DEFAULT_CONFIG]
    assert ops.gc_argv(dep, dry_run=False, delete_untagged=True, stopped=True) == [
        "podman", "run", "--rm", "--network", "host", "-v", "/opt/k8s/registry/auth:/auth:Z",
        "-v", "/opt/k8s/registry/config.yml:/etc/docker/registry/config.yml:Z", "sha256:1d",
        "garbage-collect", "--delete-untagged", ops.DEFAULT_CONFIG]
    assert "container-registry.service" in dep.describe()


# ---------------------------------------------------------------------------- the lab
def notebook(name: str, out_dir, timeout: float = 300, **params) -> tuple[str, float]:
    """(outputs text, seconds) of a section run headless; a failed cell is part of the text."""
    t0 = time.monotonic()
    nb, _ = execute(name, out_dir, expect_error=None, timeout=timeout, **params)
    return outputs_text(nb), time.monotonic() - t0


def purge():
    lab_ssh(LAB_PARAMS["rgw_host"], f"radosgw-admin bucket rm --bucket={CONTAINER} --purge-objects >/dev/null 2>&1; "
            "true", timeout=120, check=False)


def on_pod(command: str, check: bool = True) -> str:
    return lab_ssh(ADDR, command, check=check).stdout.strip()


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    from runbook_lib import lab as L
    L.add_host(NAME, ADDR, role="podman")
    on_pod(RESET)
    state = tmp_path_factory.mktemp("pod-state")
    state.chmod(0o700)
    out = tmp_path_factory.mktemp("pod-nb")
    base = dict(registry_host=ADDR, state_dir=str(state), uid=UID)
    if not rgw_answers():  # a lab just brought up has no radosgw yet: 01-rgw installs it (idempotent)
        text, _ = notebook("01-rgw", out, state_dir=str(state))
        assert "VERDICT 01-rgw: PASS" in text, text[-2000:]
    purge()
    for name in ("02-accounts", "03-certs"):
        text, _ = notebook(name, out, **base)
        assert f"VERDICT {name}: PASS" in text, text[-2000:]
    deploy = dict(base, runtime="podman", container=CONTAINER)
    dry, _ = notebook("04-registry", out, **deploy, dry_run=True)
    dry_left = on_pod(f"ls {registry.PODMAN_UNIT_PATH} /opt/k8s/registry 2>&1; podman ps -aq | wc -l")
    text, secs = notebook("04-registry", out, **deploy)
    print(f"\n04-registry runtime=podman, first run: {secs:.1f} s")
    from runbook_lib import certs
    from runbook_lib.context import Context
    ctx = Context("06-operations", dict(LAB_PARAMS, **base, dry_run=False))
    s = requests.Session()
    s.trust_env, s.verify = False, certs.ca_path(ctx)
    s.auth = (ctx.registry_user, ctx.secret("registry_password", generate=False, user=ctx.registry_user))
    yield SimpleNamespace(first=text, dry=dry, dry_left=dry_left, out=out, base=base, deploy=deploy, ctx=ctx, s=s)
    ctx.close()
    on_pod(RESET, check=False)
    purge()
    import shutil
    shutil.rmtree(f"/etc/docker/certs.d/{ADDR}:{PORT}", ignore_errors=True)  # 05-push's CA trust on this node


def container_id() -> str:
    return on_pod("podman inspect --format '{{.Id}}' registry")


def label() -> str:
    """The config hash label of the running container."""
    return on_pod("podman inspect --format '{{index .Config.Labels \"runbook.config-sha256\"}}' registry")


def push(s, repo: str, tag: str, size: int) -> tuple[str, str]:
    """An OCI image of one random layer (size bytes) and a config, over the API -> (manifest, layer digest)."""
    import sys
    sys.path.insert(0, str(NOTEBOOKS.parent / "bench"))
    import _registry as R
    layer = R.blob_upload(s, URL, repo, os.urandom(size))
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag, "rootfs": {"type": "layers",
                                                                                  "diff_ids": []}}).encode()
    c = R.blob_upload(s, URL, repo, cfg)
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": len(cfg)}
    man = json.dumps({"schemaVersion": 2, "mediaType": MT, "config": config,
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer,
                                  "size": size}]}).encode()
    return R.put_manifest(s, URL, repo, tag, man, MT), layer


def pulls_whole(s, repo: str, tag: str, digest: str) -> bool:
    import hashlib
    r = s.get(f"{URL}/v2/{repo}/manifests/{tag}", headers={"Accept": MT}, timeout=10)
    if r.status_code != 200 or r.headers.get("Docker-Content-Digest") != digest:
        return False
    for b in [r.json()["config"]] + r.json()["layers"]:
        rb = s.get(f"{URL}/v2/{repo}/blobs/{b['digest']}", timeout=30)
        if rb.status_code != 200 or "sha256:" + hashlib.sha256(rb.content).hexdigest() != b["digest"]:
            return False
    return True


@pytest.mark.lab
def test_deploys_on_a_host_with_podman_and_no_docker(pod):
    assert "VERDICT 04-registry: PASS" in pod.first, pod.first[-2500:]
    assert "podman 4.3.1, systemd" in pod.first  # pre-flight names the runtime the host has
    assert on_pod("command -v docker || echo none") == "none"
    assert on_pod(f"systemctl is-enabled {registry.PODMAN_UNIT}; systemctl is-active {registry.PODMAN_UNIT}") \
        == "enabled\nactive"
    hash_label = label()
    unit = on_pod(f"cat {registry.PODMAN_UNIT_PATH}")
    assert len(hash_label) == 64 and f"--label {registry.LABEL}={hash_label}" in unit and "--privileged" not in unit
    assert "-v /opt/k8s/registry/config.yml:/etc/docker/registry/config.yml" in unit and "--network host" in unit
    h = lab_host(ADDR)
    assert registry.podman_unit_volumes(h) == ["/opt/k8s/registry/auth:/auth", "/opt/k8s/registry/certs:/certs",
                                               "/opt/k8s/registry/config.yml:/etc/docker/registry/config.yml"]
    assert registry.container_engine(h) == "podman"
    h.close()
    assert "for podman >= 4.4" in pod.first and "ContainerName=registry" in pod.first  # Quadlet shown, not written
    assert on_pod(f"test -e {registry.QUADLET_PATH} && echo written || echo absent") == "absent"
    assert "****" in pod.first and pod.s.auth[1] not in pod.first


@pytest.mark.lab
def test_dry_run_shows_the_plan_and_changes_nothing(pod):
    assert "VERDICT 04-registry: DRY-RUN" in pod.dry, pod.dry[-1500:]
    for planned in ("podman create --name registry", "podman generate systemd --new",
                    f"write {registry.PODMAN_UNIT_PATH}", f"systemctl enable {registry.PODMAN_UNIT}"):
        assert planned in pod.dry, planned
    assert pod.dry_left.count("No such file or directory") == 2 and pod.dry_left.endswith("0"), pod.dry_left


@pytest.mark.lab
def test_second_run_changes_nothing(pod):
    before = container_id()
    text, secs = notebook("04-registry", pod.out, **pod.deploy)
    print(f"\n04-registry runtime=podman, second run: {secs:.1f} s")
    assert "VERDICT 04-registry: PASS" in text, text[-2500:]
    assert "running, config unchanged" in text and " 0 changed," in text, text[-800:]
    assert container_id() == before


@pytest.mark.lab
def test_a_config_change_remakes_the_unit_and_restarts_it(pod):
    old, old_id = label(), container_id()
    text, _ = notebook("04-registry", pod.out, **{**pod.deploy, "storage": "filesystem"})
    assert "VERDICT 04-registry: PASS" in text and "replaced (config changed)" in text, text[-1500:]
    assert label() != old and container_id() != old_id
    assert "-v /opt/k8s/registry/data:/var/lib/registry" in on_pod(f"cat {registry.PODMAN_UNIT_PATH}")
    text, _ = notebook("04-registry", pod.out, **pod.deploy)  # back to swift: the same hash as before
    assert "VERDICT 04-registry: PASS" in text and "replaced (config changed)" in text, text[-1500:]
    assert label() == old


@pytest.mark.lab
def test_preflight_refuses_docker_on_the_podman_host(pod):
    before = container_id()
    config = on_pod("sha256sum /opt/k8s/registry/config.yml")
    text, _ = notebook("04-registry", pod.out, **{**pod.deploy, "runtime": "docker", "storage": "filesystem"})
    assert "VERDICT 04-registry: PASS" not in text
    assert f"runtime: docker is not installed on {ADDR}" in text and "apt-get install docker.io" in text, text[-1500:]
    assert "or use runtime=podman" in text and "nothing was changed" in text
    assert container_id() == before and on_pod("sha256sum /opt/k8s/registry/config.yml") == config


@pytest.mark.lab
def test_docker_on_the_control_node_pushes_and_pulls(pod):
    text, secs = notebook("05-push", pod.out, **pod.base, client="docker", logout=True)
    print(f"\n05-push client=docker to the podman registry: {secs:.1f} s")
    assert "VERDICT 05-push: PASS" in text, text[-2500:]
    assert "pull back" in text


@pytest.mark.lab
def test_reboot_brings_the_registry_back_by_its_unit(pod):
    from runbook_lib import lab as L
    digest, _ = push(pod.s, "pod/boot", "v1", 64 << 10)
    old = label()
    before = container_id()
    t0 = time.monotonic()
    L.reboot(NAME)
    booted = time.monotonic()
    deadline, code = booted + 90, None
    while time.monotonic() < deadline:
        try:
            code = pod.s.get(f"{URL}/v2/", timeout=3).status_code
            if code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.2)
    back = time.monotonic()
    print(f"\nreboot: host back (ssh) in {booted - t0:.1f} s, registry 200 with credentials {back - t0:.1f} s "
          "after the poweroff began")
    assert code == 200, f"registry not back within 90 s of the boot (last {code})"
    assert on_pod(f"systemctl is-active {registry.PODMAN_UNIT}") == "active"
    assert container_id() != before  # made again by the unit at boot (--new), not a survivor
    assert label() == old
    assert pulls_whole(pod.s, "pod/boot", "v1", digest)
    text, _ = notebook("04-registry", pod.out, **pod.deploy)  # after the reboot too: nothing to change
    assert "running, config unchanged" in text and "VERDICT 04-registry: PASS" in text, text[-1500:]


@pytest.mark.lab
def test_a_stop_by_hand_leaves_the_unit_inactive_not_failed(pod):
    """An operator's `systemctl stop container-registry` (maintenance) is a clean stop: not a
    failed unit that marks the whole host degraded; 04 then starts it again."""
    on_pod(f"systemctl stop {registry.PODMAN_UNIT}")
    try:
        assert on_pod(f"systemctl is-active {registry.PODMAN_UNIT}", check=False) == "inactive"
        assert on_pod("systemctl is-system-running", check=False) == "running"
    finally:
        text, _ = notebook("04-registry", pod.out, **pod.deploy)
    assert "started (unit was stopped)" in text and "VERDICT 04-registry: PASS" in text, text[-1500:]


@pytest.mark.lab
@pytest.mark.parametrize("mode, gc_command", [("stop", "podman run --rm --network host"),
                                               ("readonly", "podman exec registry registry garbage-collect")])
def test_gc_on_the_podman_runtime_frees_space(pod, mode, gc_command):
    keep, _ = push(pod.s, "pod/app", f"keep-{mode}", MiB)
    gone, _ = push(pod.s, "pod/app", f"gone-{mode}", 2 * MiB)
    plan = ops.plan_delete(pod.ctx, "pod/app", f"gone-{mode}").value
    ops.delete_images(pod.ctx, plan)
    t0 = time.monotonic()
    rep = ops.garbage_collect(pod.ctx, gc_mode=mode)
    out = rep.value
    print(f"\nGC gc_mode={mode} on podman: freed {out['freed_bytes']} bytes, {out['freed_objects']} objects, "
          f"{time.monotonic() - t0:.1f} s")
    assert out["ran"] and out["mode"] == mode and out["freed_bytes"] >= 2 * MiB, out
    assert any(gc_command in str(getattr(r, "command", r)) for r in rep.results), rep.results
    assert pulls_whole(pod.s, "pod/app", f"keep-{mode}", keep)
    assert pod.s.get(f"{URL}/v2/pod/app/manifests/{gone}", headers={"Accept": MT}, timeout=10).status_code == 404
    assert on_pod(f"systemctl is-active {registry.PODMAN_UNIT}") == "active"
    again, _ = push(pod.s, "pod/app", f"again-{mode}", 64 << 10)  # the restart emptied the blob cache: pushes work
    assert pulls_whole(pod.s, "pod/app", f"again-{mode}", again)
