"""Typed exceptions.  Each carries structured fields (as papermill's do) and a
hint saying how to fix it; every text is masked before it is stored."""
from __future__ import annotations

from .masking import mask


class RunbookError(Exception):
    """Base class.  `hint` says what to do about it."""

    hint = ""

    def __init__(self, message: str, hint: str | None = None):
        self.message = mask(message)
        if hint is not None:
            self.hint = mask(hint)
        super().__init__(self.message)

    def __str__(self):
        text = mask(self.message)
        if self.hint:
            text += "\n  hint: " + mask(self.hint)
        return text


class ParameterError(RunbookError):
    """Bad parameters: raised before anything on a host is touched."""

    def __init__(self, problems: list[str]):
        self.problems = [mask(p) for p in problems]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{len(problems)} parameter problem(s); nothing was changed on any host:\n{lines}",
            "fix the parameters (papermill -p NAME VALUE, or the params/*.yaml file) and run again",
        )


class HostError(RunbookError):
    """Something about reaching a host."""

    def __init__(self, host: str, message: str, hint: str | None = None):
        self.host = host
        super().__init__(f"{host}: {message}", hint)


class HostUnreachable(HostError):
    pass


class HostAuthError(HostError):
    pass


class HostKeyError(HostError):
    """The host's SSH key is unknown or changed: refused (never auto-accepted)."""

    def __init__(self, host: str, known_hosts: str, kind: str):
        self.known_hosts = known_hosts
        self.kind = kind
        if kind == "changed":
            msg = f"host key CHANGED (does not match {known_hosts}); refusing to connect"
            hint = (f"if the host was really reinstalled, remove its old line: ssh-keygen -f {known_hosts} -R {host}; "
                    "otherwise treat this as a possible man-in-the-middle")
        else:
            msg = f"host key unknown (not in {known_hosts}); refusing to connect"
            hint = (f"check the key out of band, then add it: ssh-keyscan -t ed25519 {host} >> {known_hosts}"
                    " (or pass known_hosts=... pointing at a file that has it)")
        super().__init__(host, msg, hint)


class CommandFailed(HostError):
    """A remote command exited non-zero.  Fields: command, exit_code, stdout, stderr."""

    def __init__(self, host: str, command: str, exit_code: int, stdout: str = "", stderr: str = "",
                 hint: str | None = None):
        self.command = mask(command)
        self.exit_code = exit_code
        self.stdout = mask(stdout or "")
        self.stderr = mask(stderr or "")
        detail = (self.stderr.strip() or self.stdout.strip())[-2000:]
        super().__init__(host, f"command failed (exit {exit_code}): {self.command}\n{detail}", hint)


class CheckFailed(RunbookError):
    """A verification did not hold: the section's outcome is not what it must be."""

    def __init__(self, what: str, evidence: str = "", hint: str | None = None):
        self.what = mask(what)
        self.evidence = mask(evidence)
        msg = self.what + (f"\n{self.evidence}" if evidence else "")
        super().__init__(msg, hint)
