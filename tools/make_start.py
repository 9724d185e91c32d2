"""Write notebooks/00-start.ipynb (the onboarding start page).

    .venv/bin/python -m tools.make_start

The picture (second cell) is runbook_lib.diagram's SVG for the lab's parameters, as
an <img> with a data: URI in a markdown cell, so it shows as soon as the notebook is
opened, before any cell runs, in JupyterLab and in nbconvert's HTML.  (A markdown
attachment would not do: JupyterLab renders no SVG attachment; nor a stored output:
an untrusted notebook's SVG output is not rendered.)  tests/test_start_page.py checks
it is in step with diagram.py.
"""
import base64
import pathlib

import yaml

from runbook_lib import diagram
from tools.nbgen import write

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "notebooks" / "00-start.ipynb"
LAB = yaml.safe_load((ROOT / "params" / "lab.yaml").read_text())

INTRO = """
# Start here: a private Docker registry on Ceph RGW, as runbook notebooks

These notebooks **really** deploy and operate a private Docker registry (TLS and HTTP Basic
auth) whose image data lives in Ceph, through the RADOS Gateway (RGW). They follow the
original hand-run procedure section by section. Every step runs its commands on the hosts
over SSH, shows what it ran and whether it changed anything, and can be run again safely:
a second run changes nothing and says so. Nothing changes on a host until the parameters
have been checked, and no secret (password, key) is ever shown: it appears as `****`.
"""

HOSTS = """
- **control node** (this machine): runs JupyterLab and the notebooks; every command goes to
  the hosts over **SSH, port 22**, with host keys checked against `known_hosts`.
- **RGW host**: `radosgw` answers on **HTTP 7480** (Swift and S3 APIs) in front of the
  **Ceph cluster** (mon, OSDs), whose admin keyring is on that host.
- **registry host**: the `registry:2` container on **HTTPS 8000** (TLS + htpasswd); it keeps
  the image layers in RGW through the Swift API (or S3; or its own disk with `storage=filesystem`).
- **clients**: `docker login / push / pull` over **HTTPS 8000**, trusting the runbook's CA
  (in the lab the control node is the client).

## The sections, in order

| # | notebook | what it does |
|---|---|---|
| 1 | [01-rgw](01-rgw.ipynb) | deploys the RADOS Gateway on `rgw_host`; checks it answers on port 7480 |
| 2 | [02-accounts](02-accounts.ipynb) | the RGW user `demo`, its Swift subuser and key (S3 keys too) |
| 3 | [03-certs](03-certs.ipynb) | a CA and the registry's TLS certificate, with every address clients use |
| 4 | [04-registry](04-registry.ipynb) | htpasswd, `config.yml`, the registry on `registry_host`; `/v2/` says 401, then 200 with the password |
| 5 | [05-push](05-push.ipynb) | clients trust the CA, log in, push an image; its layers are seen in RGW |
| 6 | [06-operations](06-operations.ipynb) | catalog, tags, digests, deleting images and layers, garbage collection |
| 7 | [07-faq](07-faq.ipynb) | diagnoses and fixes the document's two failures (416 and 503) |
| 8 | [08-migrate](08-migrate.ipynb) | moves a swift registry to the s3 driver in place (registry 3 has no swift); plans only unless `switch=True` |
| 1–5 | [deploy](deploy.ipynb) | sections 1 to 5 in one run, for papermill (headless) |

Each notebook starts with its parameters cell, then one cell per step, and ends with a
`VERDICT ...: PASS` line. Run a whole notebook with **Run > Run All Cells**, or one cell at a
time with **Shift+Enter** to follow along. Run them in this order: each builds on the one before.
"""

POINTING = """
## Point it at the lab, or at your own hosts

- **The lab** (the default): `make lab-ui` brought up a lab on this machine, real hosts in
  network namespaces: `ceph1` 198.18.0.2 (a running Ceph; RGW comes from 01-rgw) and
  `registry1` 198.18.0.3 (its own docker engine). `params/lab.yaml` lists them, and they are
  every notebook's defaults: nothing to change, just run the cells.
- **Your own hosts**: copy `params/example.yaml` (the original document's topology,
  172.27.132.66 and .67, an example only) to `params/mine.yaml` and set the addresses,
  `ssh_user`, `ssh_key` and `known_hosts`. In JupyterLab, put the same values in each
  notebook's parameters cell. Headless:
  `runbook deploy -f params/mine.yaml --dry-run` (every command shown, none run), then
  without `--dry-run`; or `papermill --engine runbook notebooks/deploy.ipynb out.ipynb -f params/mine.yaml`.
- **Secrets are not parameters.** Set `REGISTRY_PASSWORD` in the environment before starting
  JupyterLab or papermill, or let the runbook generate one (kept mode 0600 in
  `~/.runbook-registry/secrets/`; `state_dir` moves it). Either way it is shown as `****`.
- `dry_run = True` in a parameters cell shows every command that would change something,
  and runs none of them.

The cells below draw the topology for the parameters you give and check that every host
answers over SSH. They only read: nothing changes anywhere.
"""


def _params_cell() -> str:
    L = LAB
    return f'''
rgw_host: str = "{L['rgw_host']}"  # the RGW node (Ceph admin keyring there); lab: ceph1
rgw_port: int = {L['rgw_port']}  # RGW's HTTP port (Swift/S3 API); 7480 is RGW's default
registry_host: str = "{L['registry_host']}"  # the registry node (several: "a,b"); lab: registry1
registry_port: int = {L['registry_port']}  # the registry's HTTPS port, as in the document
registry_user: str = "{L['registry_user']}"  # the registry's Basic-auth user
uid: str = "{L['uid']}"  # the RGW user id the registry stores its data as
ssh_user: str = "{L['ssh_user']}"  # SSH user on every host (the document logs in as k8s)
become: bool = {L['become']}  # privileged commands as root through sudo -n (passwordless sudo; a root login needs none)
ssh_port: int = {L['ssh_port']}  # SSH port on every host
ssh_key: str = "{L['ssh_key']}"  # SSH private key (empty: ssh's defaults)
known_hosts: str = "{L['known_hosts']}"  # host keys are checked against this file
dry_run: bool = False  # show every changing command, run none (this page only reads)
state_dir: str = ""  # control-node state (secrets 0600); empty: $RUNBOOK_STATE_DIR or ~/.runbook-registry
storage: str = "swift"  # where the registry keeps its data: swift | s3 | filesystem
'''


def picture() -> str:
    return diagram.svg(**LAB, storage="swift", title="Topology (the lab's parameters)")


ALT = "The topology: control node, registry host, RGW host with Ceph behind it, clients; SSH 22, HTTPS 8000, HTTP 7480"


def picture_cell() -> str:
    data = base64.b64encode(picture().encode()).decode()
    return f'<img alt="{ALT}" width="{diagram.W}" src="data:image/svg+xml;base64,{data}"/>'


CELLS = [
    ("md", INTRO),
    ("md", picture_cell()),
    ("md", HOSTS),
    ("md", POINTING),
    ("params", _params_cell()),
    ("md", "Check the parameters (types and values; each problem is named) before anything else."),
    ("code", 'import runbook_lib as rb\nfrom runbook_lib import start\nctx = rb.begin("00-start", globals(), reach=False)'),
    ("md", "## Your topology\n\nThe hosts, ports and protocols these parameters describe."),
    ("code", "start.topology(ctx)"),
    ("md", "## Can the runbook reach every host?\n\nA TCP connection to each host's SSH port, then an SSH "
           "login running `hostname` (host key checked against `known_hosts`). Reads only."),
    ("code", "start.reach(ctx)"),
    ("md", "## Verdict"),
    ("check", "start.check(ctx)"),
    ("md", "Next: [01-rgw](01-rgw.ipynb) deploys the RADOS Gateway. Open it and run **Run > Run All Cells**."),
]


def build(path=OUT):
    write(str(path), CELLS)
    return path


if __name__ == "__main__":
    print(build())
