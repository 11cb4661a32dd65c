"""The GLUE tasks: one registered class per row of ``tasks.glue.common.GLUE_TASKS`` (see common.py for the
data layout, the train/dev/test protocol, the model and the metrics)."""
from bench.registry import register_task
from tasks.glue.common import GLUE_TASKS, GlueTask


@register_task("glue_cola", suite="glue")
class CoLA(GlueTask):
    SPEC = GLUE_TASKS["glue_cola"]


@register_task("glue_sst2", suite="glue")
class SST2(GlueTask):
    SPEC = GLUE_TASKS["glue_sst2"]


@register_task("glue_mrpc", suite="glue")
class MRPC(GlueTask):
    SPEC = GLUE_TASKS["glue_mrpc"]


@register_task("glue_stsb", suite="glue")
class STSB(GlueTask):
    SPEC = GLUE_TASKS["glue_stsb"]


@register_task("glue_qnli", suite="glue")
class QNLI(GlueTask):
    SPEC = GLUE_TASKS["glue_qnli"]


@register_task("glue_rte", suite="glue")
class RTE(GlueTask):
    SPEC = GLUE_TASKS["glue_rte"]


@register_task("glue_wnli", suite="glue")
class WNLI(GlueTask):
    SPEC = GLUE_TASKS["glue_wnli"]


@register_task("glue_mnli", suite="glue")
class MNLI(GlueTask):
    SPEC = GLUE_TASKS["glue_mnli"]
