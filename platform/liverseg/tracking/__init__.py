"""tracking: MLflow. Runs and their lineage (`runs`), logged and registered models (`models`), the tag
and name vocabulary (`tags`), search results (`results`), the pyfunc flavour file (`pyfunc`).

Imports `model`, `data` and `core`; never Ray.
"""
