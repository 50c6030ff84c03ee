"""Evaluation: models to run (the embedded loader, tiny random models, MoEfication), the built-in texts, the NIAH
harness and the benchmark harness. Only the CLI and the package facade import this layer."""
