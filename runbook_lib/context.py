"""A section run: validated parameters, hosts, secrets, and the verdict.

Every notebook's second cell is

    ctx = runbook_lib.begin("01-rgw", globals())

which validates the parameters (types, names, values, reachability) and stops
with one message listing every problem before anything runs on a host.
"""
from __future__ import annotations

import getpass
import json
import os
import secrets as _secrets
import socket
import time

from . import journal, masking, params as P, steps
from .errors import CheckFailed, ParameterError, RunbookError
from .host import Host, connect

_current = None

# Sections whose failures the FAQ (07-faq) diagnoses: 416 on bucket creation, 503 on login.
FAQ_SECTIONS = {"02-accounts", "04-registry", "05-push", "06-operations"}

# The parameters that point 07-faq at the same hosts as the failing section.
FAQ_HINT_KEYS = ("rgw_host", "rgw_port", "registry_host", "registry_port", "storage", "runtime", "remote_dir",
                 "container", "uid", "state_dir")


def faq_hint(section: str, params: dict) -> str:
    """What another section's error hint says to run: 07-faq with the same hosts.  (Here, not in
    faq.py: a section's verdict must not import the FAQ, a higher layer; faq.hint_for is this.)"""
    parts = []
    for k in FAQ_HINT_KEYS:
        v = params.get(k)
        if v in (None, ""):
            continue
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        parts.append(f"-p {k} {v}")
    return (f"{section}: to find the cause, run notebooks/07-faq.ipynb with " + " ".join(parts)
            + " (add -p fix True to apply the fix)")


# Secrets the user may give in the environment (never as papermill parameters).
ENV_SECRETS = {"registry_password": "REGISTRY_PASSWORD"}


def current():
    return _current


def state_dir(value: str | None = None) -> str:
    d = os.path.expanduser(value or os.environ.get("RUNBOOK_STATE_DIR") or "~/.runbook-registry")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def notebook_state_dir(params: dict) -> str:
    """The state dir a notebook run with these parameters uses."""
    sd = params.get("state_dir") if isinstance(params.get("state_dir"), str) else None
    return state_dir(sd or None)


def check_hosts_report(params: dict) -> dict:
    """Context.check_hosts() as JSON for another process: the deploy notebook's kernel asks the
    section kernel, whose logins the sections then reuse.  A refusal comes back as its type,
    message and hint."""
    try:
        return {"access": Context("deploy", params).check_hosts()}
    except RunbookError as e:
        return {"error": type(e).__name__, "message": e.message, "hint": e.hint, "host": getattr(e, "host", None)}


class Context:
    def __init__(self, section: str, params: dict):
        self.section = section
        self.params = params
        self.dry_run = bool(params.get("dry_run", False))
        self.state_dir = state_dir(params.get("state_dir"))
        self.started = time.time()
        self._hosts: dict[str, Host] = {}

    def __getattr__(self, name):
        try:
            return self.__dict__["params"][name]
        except KeyError:
            raise AttributeError(name) from None

    # -- hosts -----------------------------------------------------------------
    def host(self, address: str) -> Host:
        """The host object for an address (one connection per host, reused)."""
        if address not in self._hosts:
            self._hosts[address] = connect(address, self.params, dry_run=self.dry_run)
        return self._hosts[address]

    def hosts(self, value) -> list[Host]:
        return [self.host(h) for h in P.as_list(value)]

    def check_hosts(self) -> dict[str, str]:
        """Log in to every host the parameters name and check become (a read on each): a host
        whose sudo wants a password, or whose key or login is refused, stops the run here,
        before any host is changed.  Returns {address: "sudo" | "root" | "none"}."""
        from .journal import parallel
        addrs = sorted({h for k, v in self.params.items() if k.endswith("_host") and v
                        for h in P.as_list(v) if h != "local"})
        return dict(zip(addrs, parallel(lambda a: self.host(a).check_become(), addrs)))

    @property
    def local(self) -> Host:
        return self.host("local")

    # -- secrets ---------------------------------------------------------------
    def secret(self, name: str, *, generate: bool = True, nbytes: int = 24, user: str | None = None) -> str | None:
        """A secret by name: from its environment variable, else the 0600 file
        <state_dir>/secrets/<name>, else generated there.  Always registered for masking."""
        env = ENV_SECRETS.get(name.split("@")[0])
        value = os.environ.get(env) if env else None
        path = os.path.join(self.state_dir, "secrets", name.replace("/", "_"))
        if not value and os.path.exists(path):
            with open(path) as f:
                value = f.read().strip()
        if not value and generate:
            value = _secrets.token_urlsafe(nbytes)
            self.save_secret(name, value)
        if value:
            masking.register(value, derived_for_user=user)
        return value

    def save_secret(self, name: str, value: str) -> None:
        masking.register(value)
        d = os.path.join(self.state_dir, "secrets")
        os.makedirs(d, mode=0o700, exist_ok=True)
        path = os.path.join(d, name.replace("/", "_"))
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        os.replace(path + ".tmp", path)

    # -- the end -----------------------------------------------------------------
    def verdict(self, ok: bool, summary: str, hint: str = "", **facts):
        """The section's outcome: printed for the reader (and nbval), recorded for
        the run folder, and raised as CheckFailed when it does not hold."""
        reps = [r for r in steps.reports()]
        counts = {s: sum(1 for r in reps if r.status == s) for s in ("ok", "changed", "would change", "failed")}
        status = ("DRY-RUN" if self.dry_run else "PASS") if ok else "FAIL"
        text = f"VERDICT {self.section}: {status} — {summary}"
        record = {
            "section": self.section, "status": status, "summary": masking.mask(summary),
            "facts": masking.mask({k: str(v) for k, v in facts.items()}),
            "steps": [r.record() for r in reps], "counts": counts,
            "changed": counts["changed"] + counts["would change"] > 0,
            "params": masking.mask(self.params), "started": self.started, "ended": time.time(),
            "user": getpass.getuser(), "control_node": socket.gethostname(),
        }
        run_dir = os.environ.get("RUNBOOK_RUN_DIR")
        if run_dir:
            with open(os.path.join(run_dir, f"{self.section}.verdict.json"), "w") as f:
                json.dump(record, f, indent=1)
        print(masking.mask(text))
        print(f"steps: {counts['ok']} ok, {counts['changed']} changed, {counts['would change']} would change, "
              f"{counts['failed']} failed")
        for k, v in facts.items():
            print(masking.mask(f"  {k}: {v}"))
        if not ok:
            if self.section in FAQ_SECTIONS:
                hint = (hint + "\n  " if hint else "") + faq_hint(self.section, self.params)
            raise CheckFailed(f"{self.section} did not reach its outcome: {summary}", hint=hint or None)
        return record

    def close(self):
        for h in self._hosts.values():
            h.close()


def begin(section: str, namespace: dict, reach: bool = True) -> Context:
    """Validate a notebook's parameters and start the section.  Raises
    ParameterError listing every problem, before any host is touched."""
    global _current
    steps.reset()
    params, unknown = P.collect(namespace)
    annotations = namespace.get("__annotations__", {})
    problems = P.check(params, annotations, unknown, reach=reach)
    if problems:
        raise ParameterError(problems)
    params = P.derive(params)
    ctx = Context(section, params)
    _current = ctx
    return ctx
