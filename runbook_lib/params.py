"""Parameter checks.  Every notebook's parameters are typed in its `parameters`
cell (`name: type = default  # help`, which papermill --help-notebook shows);
`check()` validates them by name and type and returns every problem at once."""
from __future__ import annotations

import ipaddress
import os
import re
import socket

# Names IPython / Jupyter put in a kernel's namespace; never parameters.
_KERNEL_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}

HOST_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
# radosgw-admin uids: we allow what is safe in paths and URLs.
UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# distribution's reference grammar for repository names (lowercase components).
REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*)*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
# str parameters that also take a YAML list (one host or several).
LIST_OK = {"registry_host"}
# Host parameters where "" means a default (e.g. ceph_admin_host: "" = rgw_host).
OPTIONAL_HOSTS = {"ceph_admin_host", "client_host", "lb_host"}  # client_host "": 07-faq checks no client (05-push: local); lb_host "": no load balancer
CHOICES = {
    "method": ("packages", "ceph-deploy", "cephadm", "existing"),
    "storage": ("swift", "s3", "filesystem"),
    "runtime": ("docker", "podman", "systemd"),  # podman: RHEL/Rocky/Alma 8+, no docker
    "client": ("docker", "podman", "skopeo"),
    "access": ("read", "write", "readwrite", "full"),
    "gc_mode": ("readonly", "stop"),
}


def host_problem(value) -> str | None:
    if not isinstance(value, str) or not value:
        return "must be an IP address or a host name"
    if value == "local":
        return None
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    if HOST_RE.match(value) and not value.replace(".", "").isdigit():
        return None
    return f"{value!r} is not an IP address or a host name"


def as_list(value) -> list:
    """'a,b' or ['a','b'] -> ['a','b'] (registry_host may be one host or several)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value or [])


def image_problem(value: str) -> str | None:
    name, _, tag = value.rpartition(":") if ":" in value.split("/")[-1] else (value, "", "")
    if not REPO_RE.match(name or ""):
        return (f"{value!r} is not a valid repository name (lowercase letters, digits and . _ - separators, "
                "components split by /), e.g. prom/node-exporter:v0.16.0")
    if tag and not TAG_RE.match(tag):
        return f"tag {tag!r} in {value!r} is not valid (letters, digits, _ . -, at most 128)"
    return None


def _type_ok(value, annotation) -> bool:
    if annotation in (None, "Any"):
        return True
    ann = annotation if isinstance(annotation, type) else None
    if isinstance(annotation, str):
        ann = {"str": str, "int": int, "bool": bool, "float": float, "list": list, "dict": dict}.get(annotation)
        if ann is None:
            return True
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is list:
        return isinstance(value, (list, str))  # "a,b" accepted for lists
    return isinstance(value, ann)


def collect(namespace: dict) -> tuple[dict, list[str]]:
    """(parameters, unknown names) from a kernel namespace after papermill injection.

    Declared parameters are the annotated names of the parameters cell; any other
    plain value in the namespace came from papermill's injected cell."""
    annotations = namespace.get("__annotations__", {})
    params = {k: namespace[k] for k in annotations if k in namespace}
    unknown = []
    for k, v in namespace.items():
        if k.startswith("_") or k in annotations or k in _KERNEL_NAMES:
            continue
        if isinstance(v, (str, int, float, bool, list, dict, type(None))):
            unknown.append(k)
    return params, sorted(unknown)


def notebook_defaults(path) -> dict:
    """The literal defaults of a notebook's parameters cell, read without a kernel or papermill
    (the CLI, before it starts one): {name: value} for `name: type = literal`."""
    import ast
    import json
    with open(path) as f:
        nb = json.load(f)
    for cell in nb.get("cells", []):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            out = {}
            try:
                tree = ast.parse(src)
            except SyntaxError:
                return {}
            for node in tree.body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                    try:
                        out[node.target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        continue
            return out
    return {}


# Parameters whose empty value stands for one made from the others (so a section run on its own
# and the deploy agree): swift_subuser "" -> "<uid>:swift", as the document names it.
DERIVED = {"swift_subuser": lambda p: f"{p['uid']}:swift" if p.get("uid") else ""}


def derive(params: dict) -> dict:
    """params with every empty derived parameter filled in."""
    out = dict(params)
    for name, make in DERIVED.items():
        if name in out and out[name] == "":
            out[name] = make(out)
    return out


def check(params: dict, annotations: dict, unknown: list[str] = (), reach: bool = True) -> list[str]:
    """Every problem with these parameters, as sentences naming the parameter."""
    problems = [f"unknown parameter {k!r} (this notebook takes: {', '.join(sorted(annotations))})"
                for k in unknown]
    for name, value in params.items():
        ann = annotations.get(name)
        if not _type_ok(value, ann) and not (name in LIST_OK and isinstance(value, list)
                                               and all(isinstance(v, str) for v in value)):
            tname = getattr(ann, "__name__", ann)
            problems.append(f"{name}: expected {tname}, got {type(value).__name__} {value!r}")
            continue
        p = _value_problem(name, value)
        if p:
            problems.append(f"{name}: {p}")
    if not problems and reach:
        problems += reachability(params)
    return problems


def _ops_problem(name: str, value) -> str | None:
    """06-operations' own parameters (repository may be a pattern like opstest/*)."""
    if name == "repository":
        plain = re.sub(r"[*?]", "x", value)
        if not REPO_RE.match(plain):
            return (f"{value!r} is not a repository name (lowercase, components split by /; * and ? allowed "
                    "as a pattern), e.g. prom/node-exporter")
    if name in ("tag", "delete_tag") and value:
        if ":" in value or value.startswith("sha256"):
            if not DIGEST_RE.match(value):
                return f"{value!r} is not a valid digest (sha256: followed by 64 lowercase hex digits)"
        elif not TAG_RE.match(value):
            return f"{value!r} is not a valid tag (letters, digits, _ . -, at most 128)"
    if name == "tag" and not value:
        return "must name a tag (or a sha256: digest)"
    if name == "delete_layer" and value and not DIGEST_RE.match(value):
        return f"{value!r} is not a valid layer digest (sha256: followed by 64 lowercase hex digits)"
    if name == "page_size" and not 1 <= value <= 1000:
        return f"{value} is out of range (1-1000: the registry answers 400 PAGINATION_NUMBER_INVALID above 1000)"
    if name == "keep_last" and value < 0:
        return f"{value} must be 0 (retention off) or more"
    if name == "tag_filter" and value:
        try:
            re.compile(value)
        except re.error as e:
            return f"{value!r} is not a valid regular expression ({e})"
    return None


def _value_problem(name: str, value) -> str | None:
    if name in ("repository", "tag", "delete_tag", "delete_layer", "page_size", "keep_last", "tag_filter"):
        p = _ops_problem(name, value)
        if p:
            return p
    if name in CHOICES and value not in CHOICES[name]:
        return f"{value!r} is not one of {', '.join(CHOICES[name])}"
    if name in OPTIONAL_HOSTS and value == "":
        return None
    if name == "rgw_name" and value and not UID_RE.match(value):
        return f"{value!r} is not a valid RGW daemon name (letters, digits, _ . -), e.g. rgw.ceph1 or gw1"
    if name.endswith("_host") or name == "registry_host":
        hosts = as_list(value)
        if not hosts:
            return "needs at least one host"
        for h in hosts:
            p = host_problem(h)
            if p:
                return p
    if name.endswith("_port"):
        if not 1 <= value <= 65535:
            return f"{value} is out of range (1-65535)"
    if name == "uid" and not UID_RE.match(value):
        return f"{value!r} is not a valid RGW user id (letters, digits, _ . -; must start with a letter or digit)"
    if name == "swift_subuser" and value:  # "" means UID:swift (derive)
        uid, _, sub = value.partition(":")
        if not sub or not UID_RE.match(uid) or not UID_RE.match(sub):
            return f"{value!r} must look like UID:NAME, e.g. demo:swift"
    if name in ("registry_user",) and not USER_RE.match(value):
        return f"{value!r} is not a valid user name (no ':' or spaces)"
    if name in ("image", "image_name"):
        return image_problem(value)
    if name in ("htpasswd_users", "remove_users"):
        for u in as_list(value):
            if not USER_RE.match(u):
                return f"{u!r} is not a valid user name (no ':' or spaces)"
    if name == "cert_sans":
        for v in as_list(value):
            p = host_problem(v)
            if p or v == "local":
                return p or "'local' is not a certificate name"
    if name == "registry_version" and value not in (2, 3):
        return f"{value} is not 2 or 3"
    if name == "remote_dir" and not (value.startswith("/") and value.strip("/")):
        return f"{value!r} must be an absolute directory other than / (it holds auth/htpasswd, certs/, config.yml)"
    if name in ("container", "probe_container") and not BUCKET_RE.match(value):
        return f"{value!r} is not a valid bucket/container name (3-63 lowercase letters, digits, '-', '.')"
    if name in ("ssh_key", "known_hosts", "ca_cert", "ca_key", "server_cert", "server_key") and value:
        path = os.path.expanduser(value)
        if not os.path.exists(path):
            return f"file {value!r} does not exist on the control node"
    if name == "s3_rootdirectory" and value and not re.fullmatch(r"/[A-Za-z0-9._/-]*[A-Za-z0-9._-]", value):
        return f"{value!r} must be empty or an absolute key prefix like /files (no trailing /)"
    if name == "symptom" and len(value) > 4000:
        return f"{len(value)} characters: paste the client's last lines only (at most 4000)"
    if name == "registry_address" and value:
        hostpart, sep, port = value.rpartition(":") if re.search(r":\d+$", value) else (value, "", "")
        p = host_problem(hostpart.strip("[]"))
        if p or hostpart == "local" or (port and not 1 <= int(port) <= 65535):
            return f"{value!r} is not HOST or HOST:PORT (as the client uses it: docker login HOST:PORT)"
    if name == "bcrypt_cost" and not 4 <= value <= 31:
        return f"{value} is out of range (4-31; 5 is the document's, 10 a good balance)"
    if name.endswith("_days") and value < 1:
        return f"{value} must be at least 1"
    return None


def reachability(params: dict, timeout: float = 3.0) -> list[str]:
    """Can we open TCP to each host's SSH port?  (A read: changes nothing.)"""
    port = params.get("ssh_port", 22)
    problems = []
    for name, value in params.items():
        if not name.endswith("_host"):
            continue
        for h in as_list(value):
            if h == "local":
                continue
            try:
                with socket.create_connection((h, port), timeout=timeout):
                    pass
            except OSError as e:
                problems.append(f"{name}: cannot reach {h}:{port} over TCP ({e.strerror or e}); "
                                "check the address and that sshd runs there")
    return problems
