"""Model registry: register with lineage, promote challenger -> champion behind a gate, roll back.

Aliases (`challenger`, `champion`), not the deprecated stages. Versions are registered into
`<name>-candidates` (alias `challenger`); promotion copies the winner into `<name>`, where `champion`
lives and serving looks (`models:/<name>@champion`): two registered models so that the tracking
server's per-model permissions separate who may add candidates from who may change what is served
(team.py). Every decision is written as tags on the challenger's version; the version that becomes
champion records the champion it replaced, which is what `rollback` returns to; every champion change
joins the history (history.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liverseg.artifact import digests, fetch, resolve_version
from liverseg.errors import RegistryError
from liverseg.history import Change, now, record
from liverseg.modelcard import TEST_GRID, update_descriptions
from liverseg.team import candidate_model, check_can_change
from liverseg.tracking import author as who
from liverseg.tracking import client as mlflow_client
from liverseg.tracking import store_datasets, tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
DEFAULT_NAME = "liver-unet"


def _alias(client, name: str, alias: str):
    """The version `alias` points at, None when the model or the alias does not exist. Any other failure
    (timeout, 5xx, 403) is raised: read as "no champion", it would let a challenger in unopposed."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        alias_missing = e.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(e) and "not found" in str(e)
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or alias_missing:
            return None
        raise


def best_of_tune_run(client, parent_run_id: str) -> str:
    """The best trial's run id of a finished search, from its MLflow parent run (tag `best_run_id`):
    a cluster job needs no tune-results.json on a pod's disk."""
    try:
        parent = client.get_run(parent_run_id)
    except Exception:
        raise RegistryError(f"tune run {parent_run_id}: not found in {tracking_uri()}") from None
    best = parent.data.tags.get("best_run_id", "None")
    if parent.data.tags.get("liverseg.kind") != "tune" or best == "None":
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
    try:
        best = json.loads(Path(tune_results).read_text())["best"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RegistryError(f"{tune_results}: not a readable tune-results.json ({type(e).__name__})") from None
    if not best.get("run_id"):
        raise RegistryError(f"{tune_results}: best trial has no MLflow run id")
    return best["run_id"]


def register(
    run_id: str | None = None,
    tune_results: str | Path | None = None,
    name: str = DEFAULT_NAME,
    tune_run: str | None = None,
    test_metrics: str | Path | None = None,
    alias: str | None = CHALLENGER,
) -> Any:
    """Register a training run's logged model as a new version of `<name>-candidates` with lineage tags;
    alias it `alias` (None: no alias moves). `test_metrics`: `liverseg evaluate`'s JSON for this model,
    tagged on the version (test Dice, grid, HD95).

    The run is given directly, as the best trial of tune-results.json, or as the best trial of the
    search whose MLflow parent run is `tune_run`.
    """
    import mlflow

    name = candidate_model(name)  # every version is a candidate; only promotion copies one into `name`
    client = mlflow_client()
    run_id = _chosen_run(client, run_id, tune_results, tune_run)
    try:
        run = client.get_run(run_id)
    except Exception:
        raise RegistryError(f"run {run_id}: not found in {tracking_uri()}") from None
    t = run.data.tags
    if "model_uri" not in t:
        raise RegistryError(f"run {run_id}: has no logged model (did training finish?)")
    test_tags = test_metric_tags(test_metrics, t["model_uri"]) if test_metrics is not None else {}
    version = _version_of_run(client, name, run_id)  # registering a run twice returns its version (DVC)
    if version is None:
        lineage = {
            **_model_digests(client, t["model_uri"]),
            "training_run_id": run_id,
            "git_commit": t.get("git_commit", "unknown"),
            "dvc_store_md5": t.get("dvc_store_md5", "untracked"),
            "store_digest": t.get("store_digest", ""),
            "store_path": t.get("store_path", ""),
            "config_hash": t.get("config_hash", ""),
            "val_dice": t.get("best_val_dice", ""),
        }
        version = _settle_race(client, name, run_id, mlflow.register_model(t["model_uri"], name, tags=lineage))
    for k, v in test_tags.items():  # also on an existing version: a later evaluation of the same model
        client.set_model_version_tag(name, str(version.version), k, v)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    update_descriptions(client, name, str(version.version))
    return client.get_model_version(name, version.version)


def gate_dice(tags: dict[str, str]) -> str | None:
    """The score the gate gave a version: the LiTS test Dice, else a store-grid one (promote without --raw)."""
    return tags.get("test_dice") or tags.get("test_dice_store_grid")


def test_metric_tags(path: str | Path, model_uri: str) -> dict[str, str]:
    """Version tags from `liverseg evaluate`'s JSON of this model: `test_dice` only for the LiTS convention
    (original grid), a store-grid figure as `test_dice_store_grid` (never two test Dices)."""
    s = json.loads(Path(path).read_text())
    if s.get("model_uri") != model_uri:
        raise RegistryError(f"{path}: scores {s.get('model_uri')}, not this run's model {model_uri}")
    original = s.get("resolution") == "original"
    hd95 = (s.get("hd95_mm") or {}).get("mean")
    return {
        "test_dice" if original else "test_dice_store_grid": f"{s['dice']['mean']:.6f}",
        "test_dice_grid": TEST_GRID if original else "store grid (not LiTS)",
        "test_hd95_mm": "" if hd95 is None else f"{hd95:.3f}",
        "test_cases": str(s.get("n_cases", "")),
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
    _wait_ready(client, name, mine.version)
    return mine


def _model_digests(client, model_uri: str) -> dict[str, str]:
    """sha256 of the logged model's weights and spec, as the version tags `artifact.load_model` checks."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="liverseg-register-") as tmp:
        model_dir, _ = fetch(client, model_uri, tmp)
        return digests(model_dir)


def _wait_ready(client, name: str, version: str, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while client.get_model_version(name, version).status != "READY":
        if time.time() > deadline:
            raise RegistryError(f"{name} v{version}: not READY after {timeout_s:.0f} s")
        time.sleep(0.5)


@dataclass
class Decision:
    name: str
    challenger: str
    champion_before: str | None
    champion_after: str | None
    challenger_dice: float
    champion_dice: float | None
    promoted: bool
    reason: str
    grid: str = TEST_GRID

    def line(self) -> str:
        champ = f"v{self.champion_before} {self.champion_dice:.4f}" if self.champion_before else "none"
        verdict = "PROMOTED" if self.promoted else "KEPT"
        return (
            f"{verdict}: {self.name} test Dice ({self.grid}): challenger v{self.challenger} "
            f"{self.challenger_dice:.4f}; champion before: {champ}; champion now: v{self.champion_after}; {self.reason}"
        )


class _Lock:
    """An exclusive lock per (tracking store, model name): promotions on one host are serialised."""

    def __init__(self, name: str):
        from filelock import FileLock

        digest = hashlib.sha256(f"{tracking_uri()}|{name}".encode()).hexdigest()[:16]
        d = Path(os.environ.get("LIVERSEG_LOCK_DIR", Path.home() / ".cache" / "liverseg" / "locks"))
        d.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(d / f"{digest}.lock"))

    def __enter__(self):
        self.lock.acquire(timeout=600)
        return self

    def __exit__(self, *exc):
        self.lock.release()


def promote(
    store_path: str,
    name: str = DEFAULT_NAME,
    min_dice: float = 0.9,
    margin: float = 0.0,
    split: str = "test",
    scorer=None,
    reason: str = "",
    raw: str | Path | None = None,
) -> Decision:
    """Evaluate `<name>-candidates@challenger` and `<name>@champion` on the same split; only if the
    challenger passes the floor and beats the champion by `margin` (strictly), copy it into `name` and
    move `champion` there. Decision, scores and reason become tags; a champion change joins the history
    with `reason` (who, when, from, to, scores). A user without EDIT on `name` is refused before the gate.

    `raw`: the LiTS NIfTI folder, so that the gate scores on each volume's original grid (the one test
    Dice, tagged `test_dice`); without it the store grid, tagged and labelled as such.
    `scorer(LoadedModel) -> mean test Dice` defaults to `evaluate` on the store (tests may pass a cheaper
    one). The bytes the gate scored are the bytes served: their sha256 become the served copy's tags,
    which only release users can write (a candidate's files or tags changed later then refuse to load).
    """
    from liverseg.artifact import load_model
    from liverseg.evaluate import evaluate

    scorer = scorer or (lambda lm: evaluate(lm.uri, store_path, split, raw, lm=lm).summary["dice"]["mean"])
    dice_tag, grid = ("test_dice", TEST_GRID) if raw else ("test_dice_store_grid", "store grid, not LiTS")
    check_can_change(name, f"promote {name}")
    client, cand = mlflow_client(), candidate_model(name)
    with _Lock(name):  # compare-and-set: nobody moves the champion between our read and our write
        chal = _alias(client, cand, CHALLENGER)
        if chal is None:
            raise RegistryError(f"{cand}: no '{CHALLENGER}' alias; run `liverseg register` first")
        champ = _alias(client, name, CHAMPION)
        if champ is not None and champ.tags.get("candidate_version") == str(chal.version):
            dice = float(champ.tags.get(dice_tag) or "nan")
            v = str(champ.version)
            return Decision(name, str(chal.version), v, v, dice, dice, False, "challenger is already champion", grid)
        scored = load_model(f"models:/{cand}/{chal.version}")
        chal_dice, pinned = float(scorer(scored)), scored.sha256
        del scored
        champ_dice = float(scorer(load_model(f"models:/{name}/{champ.version}"))) if champ else None
        ok, why = _gate(chal_dice, champ_dice, min_dice, margin)
        served = _served_copy(client, name, str(chal.version), pinned) if ok else None
        scores = {dice_tag: f"{chal_dice:.6f}", "test_dice_grid": grid}
        for k, v in _decision_tags(ok, why, scores, champ_dice, champ).items():  # the served copy carries them
            client.set_model_version_tag(cand, chal.version, k, v)
        before = str(champ.version) if champ else None
        after = before
        if ok:
            after = _crown(client, name, str(chal.version), before, pinned, served)
            change = Change(
                "promote", name, before, after, who(), now(), reason, chal_dice, champ_dice, str(chal.version)
            )
            record(client, change)
            update_descriptions(client, name, after)
        update_descriptions(client, cand, str(chal.version))
        return Decision(name, str(chal.version), before, after, chal_dice, champ_dice, ok, why, grid)


def _decision_tags(ok: bool, why: str, scores: dict[str, str], champ_dice: float | None, champ) -> dict[str, str]:
    return {
        "promotion_decision": "promoted" if ok else "rejected",
        **scores,
        "champion_test_dice": "" if champ_dice is None else f"{champ_dice:.6f}",
        "promotion_reason": why,
        "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "decided_by": who(),
        "compared_with": str(champ.version) if champ else "",
    }


def _gate(chal_dice: float, champ_dice: float | None, min_dice: float, margin: float) -> tuple[bool, str]:
    if chal_dice < min_dice:
        return False, f"below the floor {min_dice}"
    if champ_dice is not None and not chal_dice > champ_dice + margin:
        return False, f"does not beat the champion by more than {margin}"
    return True, "first champion" if champ_dice is None else f"beats the champion by more than {margin}"


def _served_copy(client, name: str, candidate: str, pinned: dict[str, str]):
    """The version of `name` that candidate `candidate` was copied to before, if any; refused when the
    files the gate just scored are not the ones that copy is pinned to."""
    found = [
        mv for mv in client.search_model_versions(f"name = '{name}'") if mv.tags.get("candidate_version") == candidate
    ]
    if found and any(found[0].tags.get(tag) != digest for tag, digest in pinned.items()):
        raise RegistryError(
            f"{candidate_model(name)} v{candidate}: its files differ from those served before as {name} "
            f"v{found[0].version}; champion kept (register the model again)"
        )
    return found[0] if found else None


def _crown(client, name: str, candidate: str, before: str | None, pinned: dict[str, str], served) -> str:
    """Move `champion` onto `served` (the candidate's earlier copy) or onto a new copy of candidate version
    `candidate` in `name`, pinned to the sha256 of the files the gate scored. Returns the served version."""
    if served is not None:
        version = str(served.version)
    else:
        version = str(client.copy_model_version(f"models:/{candidate_model(name)}/{candidate}", name).version)
        _wait_ready(client, name, version)
        for tag, value in {"candidate_version": candidate, **pinned}.items():
            client.set_model_version_tag(name, version, tag, value)
    client.set_model_version_tag(name, version, "previous_champion", before or "")
    client.set_registered_model_alias(name, CHAMPION, version)
    return version


def rollback(name: str = DEFAULT_NAME, reason: str = "") -> tuple[str, str]:
    """Put `champion` back on the champion it replaced; joins the history with `reason`.
    Returns (from version, to version)."""
    check_can_change(name, f"roll back {name}")
    client = mlflow_client()
    with _Lock(name):
        champ = _alias(client, name, CHAMPION)
        if champ is None:
            raise RegistryError(f"{name}: no champion to roll back")
        prev = champ.tags.get("previous_champion", "")
        if not prev:
            raise RegistryError(f"{name}: champion v{champ.version} replaced no earlier champion")
        try:
            client.get_model_version(name, prev)
        except Exception as e:  # deleted since (RESOURCE_DOES_NOT_EXIST), or the registry went away
            raise RegistryError(
                f"{name}: cannot roll back to v{prev}, the champion before v{champ.version} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'not found'}); champion kept"
            ) from None
        client.set_registered_model_alias(name, CHAMPION, prev)
        client.set_model_version_tag(name, champ.version, "rolled_back_at", now())
        dice = {v: gate_dice(client.get_model_version(name, v).tags) for v in (prev, str(champ.version))}
        score = {v: float(d) if d else None for v, d in dice.items()}
        change = Change(
            "rollback", name, str(champ.version), prev, who(), now(), reason, score[prev], score[str(champ.version)]
        )
        record(client, change)
        return str(champ.version), prev


def lineage(uri: str) -> list[str]:
    """The chain model version -> training run -> git commit -> DVC data hash -> store cases and split,
    each split checked against the digest the run recorded as its input (as trained / changed)."""
    from liverseg.store import SliceStore, StoreError

    client = mlflow_client()
    mv = resolve_version(client, uri)
    run = client.get_run(mv.run_id)
    t = run.data.tags
    lines = [
        f"model      {mv.name} v{mv.version} (aliases: {', '.join(mv.aliases) or '-'}) test Dice {mv.tags.get('test_dice') or 'store grid ' + mv.tags.get('test_dice_store_grid', '-')}",
        f"  run      {run.info.run_id} '{run.info.run_name}' val Dice {t.get('best_val_dice', '-')} ({run.info.status})",
        f"  parent   {t.get('mlflow.parentRunId', '-')} (tuning search)",
        f"  commit   {t.get('git_commit', 'unknown')}",
        f"  data     DVC md5 {t.get('dvc_store_md5', 'untracked')}, store digest {t.get('store_digest', '-')[:16]}",
        f"  store    {t.get('store_path', '-')}",
    ]
    trained_on = {i.dataset.name: i.dataset.digest for i in (run.inputs.dataset_inputs if run.inputs else [])}
    try:
        st = SliceStore(t.get("store_path", ""))
        splits = st.splits
        now = store_datasets(st, st.url, {s: s for s in splits})
        for (split, cases), ds in zip(splits.items(), now):
            was, digest = trained_on.get(ds.dataset.name), ds.dataset.digest
            if was is None:  # not an input of the run (the test split; runs before dataset inputs)
                check = ""
            elif was == digest:
                check = " (as trained)"
            else:
                check = f" (changed since training: {was} -> {digest})"
            lines.append(f"  {split:<8} {len(cases)} cases{check}: {', '.join(cases)}")
    except StoreError as e:
        lines.append(f"  (store not readable here: {e})")
    return lines
