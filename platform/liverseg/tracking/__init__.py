"""tracking: MLflow. Runs and their lineage (`runs`), logged and registered models (`models`), the tag
and name vocabulary (`tags`), search results (`results`), the pyfunc flavour file (`pyfunc`),
hash-chained records in registered-model tags (`chain`), and whether a served version is the one the
gate put there (`gate_marks`).

Imports `model`, `data` and `core`; never Ray.
"""
