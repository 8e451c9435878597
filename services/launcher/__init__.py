"""Run the whole stack locally: `Stack` (tests, scripts) and `python -m services.launcher`."""

from services.launcher.probes import StackError
from services.launcher.stack import Stack, StackConfig

__all__ = ["Stack", "StackConfig", "StackError"]
