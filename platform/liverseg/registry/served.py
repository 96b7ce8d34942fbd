"""The served copy: what `promote` puts behind `<name>@champion`.

It owns its bytes and shows only what the gate measured:

- files: the weights and spec the gate scored (verified against the candidate's sha256 tags, then
  scored from that very folder), logged with liverseg's own flavour (`tracking.models.log_model`) in a
  run of the experiment `liverseg-served`, which only release users and the admin may write. A
  candidate's owner who later overwrites the candidate's artifacts cannot touch the champion; nothing
  of the candidate's folder but those two scored files is copied (no MLmodel, no pickles, no code).
- tags: written by the promotion only: lineage read from the training run (run id, commit, data
  digests, config hash, validation Dice), the digests of the scored files, the gate's scores and
  decision, who and when. A candidate's own tags (a self-declared `test_dice`, `promoted_by`, Markdown)
  are never copied.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from liverseg.core.errors import RegistryError
from liverseg.tracking import tags
from liverseg.tracking.models import fetch, verify_version
from liverseg.tracking.runs import author, tracking_uri

LINEAGE_FROM_RUN = (tags.GIT_COMMIT, tags.DVC_STORE_MD5, tags.STORE_DIGEST, tags.STORE_PATH, tags.CONFIG_HASH)


class Scored:
    """A candidate's two files in a temporary folder, verified against its registry version's digests,
    and the model loaded from exactly them: what the gate scores is what gets served."""

    def __init__(self, client: Any, uri: str, device: str = "auto"):
        from liverseg.model.artifact import load_local

        self._tmp = tempfile.TemporaryDirectory(prefix="liverseg-promote-")
        self.model_dir, self.mv = fetch(client, uri, self._tmp.name)
        self.pinned = verify_version(self.model_dir, self.mv)
        self.lm = load_local(self.model_dir, device)
        self.lm.uri, self.lm.version, self.lm.sha256 = f"models:/{self.mv.name}/{self.mv.version}", self.mv, self.pinned

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> Scored:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lineage_facts(client: Any, candidate: Any) -> dict[str, str]:
    """Lineage of a candidate version from its training run (the version's run id is MLflow's own)."""
    rt = client.get_run(candidate.run_id).data.tags
    return {
        tags.TRAINING_RUN_ID: str(candidate.run_id),
        **{k: rt.get(k, "") for k in LINEAGE_FROM_RUN},
        tags.VAL_DICE: rt.get(tags.BEST_VAL_DICE, ""),
    }


def find_served_copy(client: Any, name: str, candidate: str, pinned: dict[str, str]) -> Any | None:
    """The version of `name` that candidate `candidate` was copied to before (a promotion after a
    rollback, or a re-run after a failure), if complete; refused when it is pinned to other files."""
    found = [
        mv
        for mv in client.search_model_versions(f"name = '{name}'")
        if (mv.tags or {}).get(tags.CANDIDATE_VERSION) == candidate and mv.status == "READY"
    ]
    if not found:
        return None
    mv = min(found, key=lambda m: int(m.version))
    if any(mv.tags.get(tag) != digest for tag, digest in pinned.items()):
        raise RegistryError(
            f"{tags.candidate_model(name)} v{candidate}: its files differ from those served before as {name} "
            f"v{mv.version}; champion kept (register the model again)"
        )
    return mv


def _served_experiment(client: Any) -> str:
    """The id of `liverseg-served`; on a team server (a login) the admin creates it (`liverseg users add`),
    so that no release user owns it (whoever creates an experiment may delete it)."""
    exp = client.get_experiment_by_name(tags.SERVED_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    if tracking_uri().startswith(("http://", "https://")) and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise RegistryError(
            f"experiment {tags.SERVED_EXPERIMENT} does not exist on {tracking_uri()}: the admin creates it "
            "(`liverseg users add` does)"
        )
    from liverseg.tracking.runs import experiment_id

    return experiment_id(client, tags.SERVED_EXPERIMENT)


def make_served_copy(client: Any, name: str, candidate: Any, scored: Scored, facts: dict[str, str]) -> Any:
    """Log the scored files into a new run of `liverseg-served` and register them as a new version of
    `name` carrying `facts` (and nothing else). Returns the version (READY)."""
    import mlflow

    from liverseg.registry.register import wait_ready
    from liverseg.tracking.models import log_model

    run = client.create_run(
        _served_experiment(client),
        run_name=f"{name}-from-candidate-v{candidate.version}",
        tags={
            tags.KIND: "served-copy",
            tags.MLFLOW_USER: author(),
            tags.MODEL_NAME: candidate.name,
            tags.MODEL_VERSION: str(candidate.version),
            tags.TRAINING_RUN_ID: str(candidate.run_id),
        },
    )
    with mlflow.start_run(run_id=run.info.run_id):
        info = log_model(scored.model_dir)
    client.set_terminated(run.info.run_id, "FINISHED")
    mv = mlflow.register_model(info.model_uri, name, tags=facts)
    wait_ready(client, name, str(mv.version))
    return client.get_model_version(name, str(mv.version))
