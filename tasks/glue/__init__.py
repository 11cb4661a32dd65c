"""GLUE tasks (suite ``glue``): BERT-family encoders fine-tuned per task; shared machinery in ``common``."""
