"""wove-executor-audited: an example third-party executor plugin (``"executor": "audited"``)."""

from .executor import AUDITED_OPTIONS, AuditedExecutor

__all__ = ["AUDITED_OPTIONS", "AuditedExecutor"]
