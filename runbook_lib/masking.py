"""Secret masking: register a secret once, it is shown as **** everywhere.

The registry is process-wide (a kernel runs one notebook).  So that a papermill
engine in *another* process can scrub what the kernel wrote, every registered
value is also appended to the file named by $RUNBOOK_MASK_FILE (mode 0600,
outside the run folder) when that variable is set.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import tempfile
import threading

MASK = "****"
MASK_ENV = "RUNBOOK_MASK_FILE"
# Parameters whose values are secrets by their name (secrets are not parameters, but a
# user may still pass one: -p registry_password ...); paths like ssh_key are not.
SECRET_PARAM_RE = re.compile(r"(password|passwd|secret|token|access_key|secret_key|credentials?)$", re.I)
# Shorter values would mask innocent text (a 3-char password would turn every
# "foo" into ****); we refuse to register them rather than silently not mask.
MIN_LEN = 4

_lock = threading.Lock()
_secrets: set[str] = set()


def register(value, *, derived_for_user: str | None = None) -> str:
    """Register *value* as secret; returns it unchanged so callers can chain.

    With derived_for_user, also register the forms clients store it in
    (base64 of "user:password", as in ~/.docker/config.json and Basic auth).
    """
    if value is None:
        return value
    value = str(value)
    if len(value) < MIN_LEN:
        raise ValueError(f"secret too short to mask safely (<{MIN_LEN} characters); use a longer one")
    forms = {value}
    if derived_for_user is not None:
        forms.add(base64.b64encode(f"{derived_for_user}:{value}".encode()).decode())
    # JSON-escaped form (a secret with / or " appears escaped inside JSON text)
    # Not for a value that is itself an escaped form (holds "\\"): mask files carry every form
    # to the next process, which would escape it again, doubling backslashes on every run.
    if "\\\\" not in value:
        forms.add(json.dumps(value)[1:-1])
    with _lock:
        new = forms - _secrets
        _secrets.update(forms)
    if new:
        _persist(new)
    return value


def _persist(values) -> None:
    path = os.environ.get(MASK_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        for v in values:
            f.write(json.dumps(v) + "\n")


def load_file(path: str) -> set[str]:
    """Values a mask file lists (the engine reads the kernel's registrations)."""
    out: set[str] = set()
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.add(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def secrets() -> frozenset:
    with _lock:
        return frozenset(_secrets)


def forget_all() -> None:
    """Tests only: start from an empty registry."""
    with _lock:
        _secrets.clear()


def mask(obj, extra=()):
    """Return *obj* with every registered secret replaced by ****.

    Works on str, bytes, and containers of them (dict keys and values, lists,
    tuples); anything else is returned unchanged.
    """
    values = sorted(set(secrets()) | set(extra), key=len, reverse=True)
    if not values:
        return obj
    return _mask(obj, values)


def _mask(obj, values):
    if isinstance(obj, str):
        for v in values:
            if v in obj:
                obj = obj.replace(v, MASK)
        return obj
    if isinstance(obj, bytes):
        for v in values:
            b = v.encode()
            if b in obj:
                obj = obj.replace(b, MASK.encode())
        return obj
    if isinstance(obj, dict):
        return {_mask(k, values): _mask(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask(v, values) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_mask(v, values) for v in obj)
    return obj


# -- the mask file a run's processes share ------------------------------------------------------
@contextlib.contextmanager
def env_vars(**values):
    """os.environ with these values set (None: left as it is) for the block, then as before."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def mask_session(state_dir: str):
    """A mask file for the kernel(s) to append their secrets to.

    Nested in a run that already has one (the deploy runner's sections), it is
    shared, so the parent learns the sections' secrets; otherwise a fresh 0600
    file in the state dir, removed at the end.  (Here, not in the engine, so that
    the CLI can start its kernels inside it before it imports papermill.)"""
    existing = os.environ.get(MASK_ENV)
    if existing and os.path.exists(existing):
        yield existing
        return
    fd, path = tempfile.mkstemp(prefix=".mask-", suffix=".jsonl", dir=state_dir)  # mode 0600
    os.close(fd)
    try:
        # what this process already knows goes in first, so every process sees it
        known = secrets()
        if known:
            with open(path, "a") as f:
                for v in known:
                    f.write(json.dumps(v) + "\n")
        with env_vars(**{MASK_ENV: path}):
            yield path
    finally:
        # remember what the kernel registered before the file goes
        for v in load_file(path):
            if len(v) >= MIN_LEN:
                register(v)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
