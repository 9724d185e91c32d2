"""Small helpers several lab test modules share (lab hosts, images built by hand, RGW liveness)."""
import gzip
import io
import shlex
import subprocess
import tarfile

import requests

from conftest import LAB_PARAMS


def tar_gz(files: dict) -> bytes:
    """A reproducible gzipped tar layer from {path: bytes} (fixed mtime and mode)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in sorted(files.items()):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 1700000000, 0o644
            t.addfile(ti, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def rgw_answers(host: str = LAB_PARAMS["rgw_host"], port: int = LAB_PARAMS["rgw_port"]) -> bool:
    s = requests.Session()
    s.trust_env = False  # no proxy / CA bundle from the environment
    try:
        return s.get(f"http://{host}:{port}/", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def lab_host(addr: str, **params):
    """A lab host reached the way the notebooks reach it (params/lab.yaml: ssh_user k8s, become)."""
    from runbook_lib.host import connect
    return connect(addr, {**LAB_PARAMS, **params})


def lab_ssh(addr: str, command: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """A shell command as root on a lab host over plain OpenSSH (k8s + sudo -n): the tests' own
    hands on a host, outside the runbook's host layer."""
    from runbook_lib import lab
    r = subprocess.run(lab.ssh_argv(addr, "sudo -n sh -c " + shlex.quote(command)), capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{addr}: {command}: exit {r.returncode}: {r.stderr[-500:]}")
    return r
