"""Tasks register themselves on import; add one import line per new task module."""
import importlib

# One line per task module. Modules still missing in a checkout are skipped (none should be).
_TASK_MODULES = [
    "tasks.lra.listops",
]
for _m in _TASK_MODULES:
    importlib.import_module(_m)
