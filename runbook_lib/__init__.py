"""runbook_lib: the library behind the registry-on-Ceph-RGW runbook notebooks.

Notebooks call `begin(section, globals())`, then one library function per step,
then `ctx.verdict(...)`.  Every command on every host goes through `host.Host.run`.
"""
import sys

# papermill -> nbformat -> jsonschema imports rfc3987_syntax, which compiles ~38 Lark grammars at
# import: 0.7 s in a plain process, 4 s in a kernel (jsonschema#1428).  Only jsonschema's "iri"
# format checker needs it, and no notebook schema uses that format.  A deploy re-run went from
# 17.5 s to 10 s without it (bench/results.md).
sys.modules.setdefault("rfc3987_syntax", None)
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
