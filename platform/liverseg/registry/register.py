"""Register: a training run's logged model becomes a new version of `<name>-candidates`, with lineage
tags (training run, git commit, DVC hash, store digest, config hash), the sha256 of its two files, test
scores when given, a Markdown description, and the alias `challenger`.

The run is given directly, as the best trial of a search's results file, or as the best trial of the
search whose MLflow parent run is given (a cluster job needs no results file on a pod's disk).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from liverseg.core.errors import InputError, RegistryError
from liverseg.core.limits import MAX_METADATA_BYTES
from liverseg.registry.modelcard import TEST_GRID, update_descriptions
from liverseg.tracking import tags
from liverseg.tracking.models import digests, fetch
from liverseg.tracking.results import read_results
from liverseg.tracking.runs import client as mlflow_client
from liverseg.tracking.runs import failure


def best_of_tune_run(client, parent_run_id: str) -> str:
    """The best trial's run id of a finished search, from its MLflow parent run (tag `best_run_id`):
    a cluster job needs no tune-results.json on a pod's disk."""
    try:
        parent = client.get_run(parent_run_id)
    except Exception as e:
        raise failure(e, f"tune run {parent_run_id}") from None
    best = parent.data.tags.get(tags.BEST_RUN_ID, "None")
    if parent.data.tags.get(tags.KIND) != "tune" or best == "None":
        raise RegistryError(f"run {parent_run_id}: not a finished liverseg tuning search (no best_run_id tag)")
    return best


def _chosen_run(client, run_id: str | None, tune_results: str | Path | None, tune_run: str | None) -> str:
    """The run to register: given, the best trial of tune-results.json, or of the search `tune_run`."""
    if sum(x is not None for x in (run_id, tune_results, tune_run)) != 1:
        raise RegistryError(
            "give exactly one of --run RUN_ID, --best-of-tune tune-results.json or --best-of-tune-run PARENT_RUN_ID"
        )
    if tune_run is not None:
        return best_of_tune_run(client, tune_run)
    if tune_results is None:
        return run_id
    best = read_results(tune_results).best
    if not best.run_id:
        raise InputError(f"{tune_results}: best trial has no MLflow run id")
    return best.run_id


def register(
    run_id: str | None = None,
    tune_results: str | Path | None = None,
    name: str = tags.SERVED_MODEL,
    tune_run: str | None = None,
    test_metrics: str | Path | None = None,
    alias: str | None = tags.CHALLENGER,
) -> Any:
    """Register a training run's logged model as a new version of `<name>-candidates` with lineage tags;
    alias it `alias` (None: no alias moves). `test_metrics`: `liverseg evaluate`'s JSON for this model,
    tagged on the version (test Dice, grid, HD95).

    The run is given directly, as the best trial of tune-results.json, or as the best trial of the
    search whose MLflow parent run is `tune_run`.
    """
    import mlflow

    name = tags.candidate_model(name)  # every version is a candidate; only promotion copies one into `name`
    client = mlflow_client()
    run_id = _chosen_run(client, run_id, tune_results, tune_run)
    try:
        run = client.get_run(run_id)
    except Exception as e:
        raise failure(e, f"run {run_id}") from None
    t = run.data.tags
    if tags.MODEL_URI not in t:
        raise RegistryError(f"run {run_id}: has no logged model (did training finish?)")
    model_uri = t[tags.MODEL_URI]
    test_tags = test_metric_tags(test_metrics, model_uri) if test_metrics is not None else {}
    version = _version_of_run(client, name, run_id)  # registering a run twice returns its version (DVC)
    if version is None:
        lineage = {
            **_model_digests(client, model_uri),
            tags.TRAINING_RUN_ID: run_id,
            tags.GIT_COMMIT: t.get(tags.GIT_COMMIT, "unknown"),
            tags.DVC_STORE_MD5: t.get(tags.DVC_STORE_MD5, "untracked"),
            tags.STORE_DIGEST: t.get(tags.STORE_DIGEST, ""),
            tags.STORE_PATH: t.get(tags.STORE_PATH, ""),
            tags.CONFIG_HASH: t.get(tags.CONFIG_HASH, ""),
            tags.VAL_DICE: t.get(tags.BEST_VAL_DICE, ""),
        }
        version = _settle_race(client, name, run_id, mlflow.register_model(model_uri, name, tags=lineage))
    for k, v in test_tags.items():  # also on an existing version: a later evaluation of the same model
        client.set_model_version_tag(name, str(version.version), k, v)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    update_descriptions(client, name, str(version.version))
    return client.get_model_version(name, version.version)


def test_metric_tags(path: str | Path, model_uri: str) -> dict[str, str]:
    """Version tags from `liverseg evaluate`'s JSON of this model: `test_dice` only for the LiTS convention
    (original grid), a store-grid figure as `test_dice_store_grid` (never two test Dices)."""
    try:
        if Path(path).stat().st_size > MAX_METADATA_BYTES:
            raise ValueError(f"larger than {MAX_METADATA_BYTES} bytes")
        s = json.loads(Path(path).read_bytes())
        dice, hd95 = s["dice"]["mean"], (s.get("hd95_mm") or {}).get("mean")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (dice, hd95 or 0.0)):
            raise ValueError("dice.mean and hd95_mm.mean must be numbers")
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise InputError(
            f"{path}: not the JSON `liverseg evaluate` writes ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    if s.get("model_uri") != model_uri:
        raise RegistryError(f"{path}: scores {str(s.get('model_uri'))[:200]}, not this run's model {model_uri}")
    original = s.get("resolution") == "original"
    return {
        tags.TEST_DICE if original else tags.TEST_DICE_STORE_GRID: f"{dice:.6f}",
        tags.TEST_DICE_GRID: TEST_GRID if original else "store grid (not LiTS)",
        tags.TEST_HD95: "" if hd95 is None else f"{hd95:.3f}",
        tags.TEST_CASES: str(s.get("n_cases", ""))[:20],
    }


def _version_of_run(client, name: str, run_id: str):
    """The registered version of a run: the lowest number, should racing registrations have made several."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(found, key=lambda mv: int(mv.version), default=None)


def _settle_race(client, name: str, run_id: str, mine):
    """Registrations of one run that raced (other processes, other hosts, one registry server) agree on
    the lowest version number: versions are numbered in creation order, so whoever created a higher one
    sees the lower one on re-reading and deletes its own. Works on any MLflow backend, no lock needed."""
    winner = _version_of_run(client, name, run_id)
    if winner is not None and int(winner.version) < int(mine.version):
        client.delete_model_version(name, mine.version)
        mine = winner
    wait_ready(client, name, mine.version)
    return mine


def _model_digests(client, model_uri: str) -> dict[str, str]:
    """sha256 of the logged model's weights and spec, as the version tags `artifact.load_model` checks."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="liverseg-register-") as tmp:
        model_dir, _ = fetch(client, model_uri, tmp)
        return digests(model_dir)


def wait_ready(client, name: str, version: str, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while client.get_model_version(name, version).status != "READY":
        if time.time() > deadline:
            raise RegistryError(f"{name} v{version}: not READY after {timeout_s:.0f} s")
        time.sleep(0.5)
