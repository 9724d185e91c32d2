"""runbook_lib: the library behind the registry-on-Ceph-RGW runbook notebooks.

Notebooks call `begin(section, globals())`, then one library function per step,
then `ctx.verdict(...)`.  Every command on every host goes through `host.Host.run`.
"""
from .context import Context, begin, current
from .errors import (CheckFailed, CommandFailed, HostAuthError, HostError, HostKeyError, HostUnreachable,
                     ParameterError, RunbookError)
from .host import LocalHost, SSHHost, argv, cmd
from .masking import mask
from .steps import StepReport, step

__version__ = "0.1.0"
__all__ = ["Context", "begin", "current", "CheckFailed", "CommandFailed", "HostAuthError", "HostError",
           "HostKeyError", "HostUnreachable", "ParameterError", "RunbookError", "LocalHost", "SSHHost", "argv",
           "cmd", "mask", "StepReport", "step", "__version__"]
