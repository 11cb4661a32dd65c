"""Tasks register themselves on import; add one import line per new task module."""
import importlib

# One line per task module; a new task is one new file plus one line here.
_TASK_MODULES = [
    "tasks.kernel_sweep",
    "tasks.moe_ffn_sweep",
    "tasks.lra.listops",
    "tasks.lra.text",
    "tasks.lra.image",
    "tasks.lra.pathfinder",
    "tasks.lra.retrieval",
    "tasks.lm.wikitext",
    "tasks.glue.tasks",
    "tasks.mt.multi30k",
    "tasks.summarization.qmsum",
    "tasks.summarization.pubmed",
]
for _m in _TASK_MODULES:
    importlib.import_module(_m)
