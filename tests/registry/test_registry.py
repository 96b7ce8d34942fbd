"""Registry against a real local SQLite store and a real `mlflow server` started on 127.0.0.1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from liverseg.core.errors import RegistryError
from liverseg.registry.champion import alias_version
from liverseg.registry.history import history
from liverseg.registry.history import line as history_line
from liverseg.registry.lineage import lineage
from liverseg.registry.promote import promote, rollback
from liverseg.registry.register import register
from support.models import constant_state, log_model_run
from support.net import free_port


def _versions(name="liver-unet"):
    from mlflow.tracking import MlflowClient

    from liverseg.tracking.runs import tracking_uri

    c = MlflowClient(tracking_uri())
    return c, {
        str(mv.version): c.get_model_version(name, mv.version) for mv in c.search_model_versions(f"name = '{name}'")
    }


def _check_flow(store_path):
    """register -> promote (floor) -> better challenger promoted -> worse kept -> rollback."""
    none_run, _ = log_model_run(constant_state(liver=False), store_path=store_path)
    all_run, _ = log_model_run(constant_state(liver=True), store_path=store_path)
    mv = register(run_id=none_run)
    assert str(mv.version) == "1" and "challenger" in mv.aliases and mv.tags["training_run_id"] == none_run
    assert mv.tags["git_commit"] == "abc123" and mv.tags["dvc_store_md5"] == "d41d8cd9"
    d = promote(store_path, min_dice=0.0)  # first model: the floor alone (Dice 0 >= 0)
    assert d.promoted and d.reason.startswith("rule floor (no champion)") and d.champion_after == "1"
    register(run_id=all_run)
    d = promote(store_path, min_dice=0.99)
    assert not d.promoted and "floor" in d.reason and d.champion_after == "1"
    d = promote(store_path, min_dice=0.0)
    assert d.promoted and d.challenger_dice > d.champion_dice == 0.0 and d.champion_after == "2"
    client, vs = _versions()
    assert vs["2"].tags["promotion_decision"] == "promoted" and vs["2"].tags["previous_champion"] == "1"
    assert "champion" in vs["2"].aliases
    assert str(register(run_id=all_run).version) == "2"  # same run again: same version, no duplicate
    text = "\n".join(lineage("models:/liver-unet@champion"))
    assert all_run in text and "abc123" in text and "d41d8cd9" in text and "test" in text
    # the splits the run recorded as inputs are checked against the store as it is now
    from mlflow.entities import Dataset, DatasetInput

    from liverseg.data.store import SliceStore
    from liverseg.tracking.provenance import store_datasets

    train_in, val_in = store_datasets(SliceStore(store_path), store_path, {"train": "training", "val": "validation"})
    d = val_in.dataset  # as if the run had trained on another version of the validation cases
    stale = DatasetInput(Dataset(d.name, "0" * 16, d.source_type, d.source, d.schema, d.profile), val_in.tags)
    client.log_inputs(all_run, datasets=[train_in, stale])
    lines = {ln.split()[0]: ln for ln in lineage("models:/liver-unet@champion")}
    assert "(as trained)" in lines["train"] and f"(changed since training: {'0' * 16} -> {d.digest})" in lines["val"]
    assert "since training" not in lines["test"] and "as trained" not in lines["test"]  # not an input of this run
    assert rollback() == ("2", "1")
    _, vs = _versions()
    assert "champion" in vs["1"].aliases
    with pytest.raises(RegistryError, match="replaced no earlier champion"):
        rollback()


def test_registry_flow_sqlite(mlflow_uri, store_path):
    _check_flow(store_path)


def test_register_tags_lits_test_dice_and_writes_descriptions(mlflow_uri, store_path, phantom_dir, tmp_path):
    """The candidate version carries `liverseg evaluate`'s LiTS test Dice; models and versions get Markdown
    descriptions; inside `dvc exp run` no alias moves unless asked; promote scores on the original grid."""
    import json

    from liverseg.registry.evaluate import evaluate, write_outputs

    run, uri = log_model_run(constant_state(liver=True), store_path=store_path)
    ev = evaluate(uri, store_path, "test", raw=phantom_dir)
    write_outputs(ev, tmp_path / "test-metrics.json")
    env = {**os.environ, "DVC_EXP_NAME": "exp-1"}
    cli = [sys.executable, "-m", "liverseg.cli", "register", "--run", run, "--test-metrics", "test-metrics.json"]
    res = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "without an alias (experiment exp-1" in res.stdout, res.stderr
    client, vs = _versions("liver-unet-candidates")
    mv = vs["1"]
    assert not mv.aliases and mv.tags["test_dice"] == f"{ev.summary['dice']['mean']:.6f}"
    assert "(original grid, per volume (LiTS))" in mv.description
    assert "| v1 | - |" in client.get_registered_model("liver-unet-candidates").description
    for text in (run, "abc123", "d41d8cd9", "**Config**"):  # lineage, data digest, config
        assert text in mv.description, text
    other, _ = log_model_run(constant_state(liver=False), store_path=store_path)
    with pytest.raises(RegistryError, match="not this run's model"):
        register(run_id=other, test_metrics=tmp_path / "test-metrics.json")
    assert set(_versions("liver-unet-candidates")[1]) == {"1"}  # the refused registration left no version
    assert register(run_id=run).aliases == ["challenger"]
    d = promote(store_path, min_dice=0.0, raw=phantom_dir, reason="first LiTS-scored model")
    assert d.challenger_dice == pytest.approx(ev.summary["dice"]["mean"]) and "(LiTS)" in d.line()
    served = client.get_model_version("liver-unet", d.champion_after)
    assert served.tags["test_dice"] == f"{d.challenger_dice:.6f}"
    assert "**Promotion**: promoted by " in served.description and "rule floor" in served.description
    assert "| v1 | champion |" in client.get_registered_model("liver-unet").description
    assert json.loads((tmp_path / "test-metrics.json").read_text())["resolution"] == "original"


def test_register_needs_a_logged_model(mlflow_uri):
    from mlflow.tracking import MlflowClient

    from liverseg.tracking.runs import experiment_id

    c = MlflowClient(mlflow_uri)
    rid = c.create_run(experiment_id(c, "liverseg")).info.run_id
    with pytest.raises(RegistryError, match="no logged model"):
        register(run_id=rid)
    with pytest.raises(RegistryError, match="exactly one"):
        register()


@pytest.mark.slow
def test_racing_promotions_stay_consistent(mlflow_uri, store_path, tmp_path):
    """Two `liverseg promote` processes at once on the same challenger: one promotes, one sees it done."""
    run, _ = log_model_run(constant_state(liver=True), store_path=store_path)
    register(run_id=run)
    env = {**os.environ, "LIVERSEG_LOCK_DIR": str(tmp_path / "locks")}
    cmd = [sys.executable, "-m", "liverseg.cli", "promote", "--store", store_path, "--min-dice", "0"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(o.split(":")[0] for o in outs) == ["KEPT", "PROMOTED"], outs
    _, vs = _versions()
    assert list(vs) == ["1"] and "champion" in vs["1"].aliases
    assert vs["1"].tags["previous_champion"] == ""  # never points at itself


@pytest.mark.slow
def test_registry_flow_against_mlflow_server(mlflow_server, store_path):
    _check_flow(store_path)


def test_unreachable_server_fails_fast(monkeypatch):
    from liverseg.core.errors import TrackingError
    from liverseg.tracking.runs import check_tracking

    with pytest.raises(TrackingError, match="not reachable") as e:
        check_tracking(f"http://127.0.0.1:{free_port()}", timeout_s=3)
    assert "\n" not in str(e.value)


def test_register_best_of_tune_run_from_mlflow(mlflow_uri):
    """The best trial is found from the search's parent run: no tune-results.json on any disk."""
    from mlflow.tracking import MlflowClient

    from liverseg.tracking.runs import experiment_id, tracking_uri

    client = MlflowClient(tracking_uri())
    best, _ = log_model_run(constant_state(liver=True))
    exp = experiment_id(client, "liverseg")
    parent = client.create_run(exp, tags={"liverseg.kind": "tune", "best_run_id": best}).info.run_id
    mv = register(tune_run=parent)
    assert mv.run_id == best and "challenger" in client.get_model_version("liver-unet-candidates", mv.version).aliases
    with pytest.raises(RegistryError, match=f"run {best}: not a finished liverseg tuning search"):
        register(tune_run=best)
    with pytest.raises(RegistryError, match="exactly one of"):
        register(run_id=best, tune_run=parent)


def _race_register(run_ids: list[str]) -> list[set[str]]:
    """Two `liverseg register --run R` started together per run; returns the versions each pair printed."""
    import re

    seen = []
    for rid in run_ids:
        cmd = [sys.executable, "-m", "liverseg.cli", "register", "--run", rid]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        seen.append({re.search(r" v(\d+) ", out).group(1) for out, _ in outs})
    return seen


def _check_register_race(store_path):
    """Two registrations of one run racing (2 of 3 tries made two versions): one version per run, and
    both commands name it."""
    runs = [log_model_run(constant_state(liver=True), store_path=store_path)[0] for _ in range(2)]
    printed = _race_register(runs)
    _, vs = _versions("liver-unet-candidates")
    per_run = {r: sorted(v for v, mv in vs.items() if mv.run_id == r) for r in runs}
    assert all(len(v) == 1 for v in per_run.values()), per_run
    assert printed == [set(per_run[r]) for r in runs]


@pytest.mark.slow
def test_racing_registrations_make_one_version_sqlite(mlflow_uri, store_path):
    _check_register_race(store_path)


@pytest.mark.slow
def test_racing_registrations_make_one_version_server(mlflow_server, store_path):
    _check_register_race(store_path)


def test_rollback_to_a_deleted_version_is_one_line(mlflow_uri, store_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from liverseg.tracking.runs import tracking_uri

    client = MlflowClient(tracking_uri())
    for liver in (False, True):  # two served versions, as promotions made them
        mlflow.register_model(log_model_run(constant_state(liver=liver), store_path=store_path)[1], "liver-unet")
    client.set_registered_model_alias("liver-unet", "champion", "2")
    client.set_model_version_tag("liver-unet", "2", "previous_champion", "1")
    client.delete_model_version("liver-unet", "1")
    with pytest.raises(RegistryError, match="cannot roll back to v1"):
        rollback()
    res = subprocess.run([sys.executable, "-m", "liverseg.cli", "rollback"], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "cannot roll back to v1" in res.stderr
    assert "Traceback" not in res.stderr
    assert str(client.get_model_version_by_alias("liver-unet", "champion").version) == "2"


def test_served_copy_owns_the_scored_bytes_and_only_the_gates_facts(mlflow_uri, store_path):
    """Whoever may edit a candidate (its tags, its artifact files) changes nothing of what is served: a
    blanked digest tag is refused before the gate; the served copy is the scored weights and spec logged
    anew in `liverseg-served`, tagged only by the promotion, so later swapped candidate files and
    self-declared tags (a test Dice of 0.999, `promoted_by`, Markdown) never reach the champion."""
    import torch

    from liverseg.core.errors import ModelError
    from liverseg.model.artifact import WEIGHTS_FILE
    from liverseg.tracking.models import digests, load_model
    from liverseg.tracking.runs import client as mlflow_client
    from liverseg.tracking.tags import SPEC_SHA256 as SPEC_TAG
    from liverseg.tracking.tags import WEIGHTS_SHA256 as WEIGHTS_TAG

    rid, uri = log_model_run(constant_state(liver=True), store_path=store_path)
    mv = register(run_id=rid)
    client = mlflow_client()
    client.set_model_version_tag(mv.name, mv.version, WEIGHTS_TAG, "")  # a scientist may edit the tag
    with pytest.raises(ModelError, match=f"no {WEIGHTS_TAG} tag"):
        load_model(f"models:/{mv.name}@challenger", "cpu")
    with pytest.raises(ModelError, match=f"no {WEIGHTS_TAG} tag"):
        promote(store_path, min_dice=0.0)  # refused before the gate: no unverified bytes are scored
    assert alias_version(client, "liver-unet", "champion") is None

    folder = Path(client.get_logged_model(uri.split("/")[-1]).artifact_location) / "artifacts" / "m"
    scored = digests(folder)
    client.set_model_version_tag(mv.name, mv.version, WEIGHTS_TAG, scored[WEIGHTS_TAG])
    for key, value in {"test_dice": "0.999", "promoted_by": "mallory", "note": "<b>[click](http://x)</b>"}.items():
        client.set_model_version_tag(mv.name, mv.version, key, value)  # self-declared, before promotion
    d = promote(store_path, min_dice=0.0)
    served = client.get_model_version("liver-unet", d.champion_after)
    assert (served.tags[WEIGHTS_TAG], served.tags[SPEC_TAG]) == (scored[WEIGHTS_TAG], scored[SPEC_TAG])
    assert served.tags["test_dice_store_grid"] == f"{d.challenger_dice:.6f}" and "test_dice" not in served.tags
    assert "promoted_by" not in served.tags and "note" not in served.tags and served.tags["decided_by"]
    assert (
        client.get_run(served.run_id).info.experiment_id
        == client.get_experiment_by_name("liverseg-served").experiment_id
    )
    assert served.tags["training_run_id"] == rid and "0.999" not in served.description
    # the candidate's files are swapped and its tags made to match them: the champion still loads its own
    torch.save(constant_state(liver=False), folder / WEIGHTS_FILE)
    client.set_model_version_tag(mv.name, mv.version, WEIGHTS_TAG, digests(folder)[WEIGHTS_TAG])
    assert load_model(f"models:/{mv.name}@challenger", "cpu").sha256 == digests(folder)  # the candidate's own check
    assert load_model("models:/liver-unet@champion", "cpu").sha256[WEIGHTS_TAG] == scored[WEIGHTS_TAG]


def test_a_failing_champion_lookup_is_not_read_as_no_champion(mlflow_uri, monkeypatch):
    """Only "no such model / alias" means no champion; any other error (here an unreachable registry)
    is raised, never taken as a first promotion."""
    from mlflow.tracking import MlflowClient

    from liverseg.core.errors import TrackingError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(mlflow_uri)
    assert alias_version(client, "liver-unet", "champion") is None  # no such model
    client.create_registered_model("liver-unet")
    assert alias_version(client, "liver-unet", "champion") is None  # no such alias
    with pytest.raises(TrackingError, match="^liver-unet@champion: tracking server .* not reachable"):
        alias_version(MlflowClient(f"http://127.0.0.1:{free_port()}"), "liver-unet", "champion")


def test_promote_prints_and_records_the_shadow_evidence(mlflow_uri, store_path):
    """The challenger's agreement with the champion on live traffic (written by a shadowing replica) is
    printed beside the gate's numbers and recorded with the decision; evidence against another champion
    is not this comparison's."""
    from liverseg.tracking.runs import client as mlflow_client
    from liverseg.tracking.shadow import ShadowSummary, write_evidence

    register(run_id=log_model_run(constant_state(liver=False), store_path=store_path)[0])
    first = promote(store_path, min_dice=0.0)
    assert first.shadow is None and first.line().endswith(
        "no shadow evidence for this challenger against this champion"
    )
    mv = register(run_id=log_model_run(constant_state(liver=True), store_path=store_path)[0])
    client = mlflow_client()
    seen = ShadowSummary(mv.name, str(mv.version), 40, 0.912, 0.801, 35.25, "2026-12-01T10:00:00.000000Z")
    write_evidence(client, ShadowSummary(**{**seen.to_json(), "against": (first.champion_after,)}))
    write_evidence(client, ShadowSummary(**{**seen.to_json(), "compared": 9, "against": ("99",), "replicas": ("x",)}))
    d = promote(store_path, min_dice=0.0)
    assert d.promoted and d.shadow.compared == 40
    assert d.line().endswith(
        "shadow on live traffic: 40 requests compared since 2026-12-01T10:00:00.000000Z, Dice mean 0.9120, "
        "5th percentile 0.8010, largest volume difference 35.2 ml"
    )
    t = client.get_model_version(mv.name, mv.version).tags
    assert (t["shadow.compared"], t["shadow.dice_mean"], t["shadow.dice_p05"]) == ("40", "0.912000", "0.801000")
    records, _ = history(client, "liver-unet")
    assert records[0].gate["shadow.volume_diff_ml_max"] == "35.250" and "shadow 40 requests" in history_line(records[0])
