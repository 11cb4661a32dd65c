from tasks.lra.common import LRAClassificationTask  # placeholder
