"""registry: what decides which model is served. Evaluation on a split, registration with lineage, the
paired promotion gate, the served copy, moving the champion, rollback, approval requests, lineage, the
hash-chained champion history, model cards, team accounts and roles, and the guard the MLflow tracking
server runs as its authorization function (`guard`).

Imports `tracking`, `model`, `data`, `core` (and MLflow's server modules, in `guard` and `team`); not its
siblings `training` and `serving`.
"""
