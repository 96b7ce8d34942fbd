"""training: Ray Train runs and Ray Tune searches. Batches in memory, the hybrid loss, the per-worker
loop, one training run with its MLflow run, the search (definition, running, report).

Imports `tracking`, `model`, `data`, `core`; not its siblings `registry` and `serving`.
"""
