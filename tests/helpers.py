"""Small helpers several lab test modules share (images built by hand, RGW liveness)."""
import gzip
import io
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
