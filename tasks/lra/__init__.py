"""Long Range Arena tasks (suite ``lra``)."""
