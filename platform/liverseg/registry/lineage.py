"""Lineage: model version -> training run -> git commit -> DVC data hash -> store cases and splits, each
split checked against the digest the run recorded as its input (as trained / changed since)."""

from __future__ import annotations

from liverseg.registry.history import printable
from liverseg.tracking import tags
from liverseg.tracking.models import resolve_version
from liverseg.tracking.provenance import store_datasets
from liverseg.tracking.runs import client as mlflow_client
from liverseg.tracking.runs import failure


def _dice(t: dict[str, str]) -> str:
    return t.get(tags.TEST_DICE) or "store grid " + t.get(tags.TEST_DICE_STORE_GRID, "-")


def lineage(uri: str) -> list[str]:
    """The chain model version -> training run -> git commit -> DVC data hash -> store cases and split,
    each split checked against the digest the run recorded as its input (as trained / changed)."""
    from liverseg.core.errors import StoreError
    from liverseg.data.store import SliceStore

    client = mlflow_client()
    mv = resolve_version(client, uri)
    try:
        run = client.get_run(
            (mv.tags or {}).get(tags.TRAINING_RUN_ID) or mv.run_id
        )  # a served copy's run holds only files
    except Exception as e:
        raise failure(e, f"{uri}: its training run") from None
    t = run.data.tags
    lines = [
        f"model      {mv.name} v{mv.version} (aliases: {', '.join(mv.aliases) or '-'}) test Dice {_dice(mv.tags or {})}",
        f"  run      {run.info.run_id} '{run.info.run_name}' val Dice {t.get(tags.BEST_VAL_DICE, '-')} ({run.info.status})",
        f"  parent   {t.get(tags.MLFLOW_PARENT_RUN_ID, '-')} (tuning search)",
        f"  commit   {t.get(tags.GIT_COMMIT, 'unknown')}",
        f"  data     DVC md5 {t.get(tags.DVC_STORE_MD5, 'untracked')}, store digest {t.get(tags.STORE_DIGEST, '-')[:16]}",
        f"  store    {t.get(tags.STORE_PATH, '-')}",
    ]
    trained_on = {i.dataset.name: i.dataset.digest for i in (run.inputs.dataset_inputs if run.inputs else [])}
    try:
        st = SliceStore(t.get(tags.STORE_PATH, ""))
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
    return [printable(line) for line in lines]  # tags and names are user text: no control characters reach the terminal
