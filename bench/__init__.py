"""sparsebench harness: registries, configs, training loop, measurement, records and reports."""
