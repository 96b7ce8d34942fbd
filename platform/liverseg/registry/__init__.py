"""registry: what decides which model is served. Evaluation on a split, registration with lineage, the
promotion gate, rollback, lineage, the champion history, model cards, team accounts and roles.

Imports `tracking`, `model`, `data`, `core`; not its siblings `training` and `serving`.
"""
