"""The registry's Markdown descriptions: one for the registered model, one per version (MLflow shows both
on the model's and the version's page).

A version's description is rebuilt from what the registry and its training run hold (tags, params,
inputs), so it is never out of step with them: call `update_descriptions` after anything changes them
(registration, an evaluation, a promotion decision).
"""

from __future__ import annotations

from typing import Any

from liverseg.tracking import tags

TEST_GRID = "original grid, per volume (LiTS)"  # the one test Dice; a store-grid figure says so
KEY_PARAMS = ("model.encoder", "model.encoder_weights", "train.epochs", "train.batch_size", "train.lr")
KEY_PARAMS += ("loss.dice_weight", "loss.ce_weight", "data.window")


def _fmt(v: Any, digits: int = 4) -> str:
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v) if v not in (None, "") else "-"


def version_description(mv: Any, run: Any) -> str:
    """Markdown: scores (test on the LiTS grid, validation), data, config, lineage, promotion history."""
    t, rt, p = mv.tags, run.data.tags, run.data.params
    grid = t.get(tags.TEST_DICE_GRID, TEST_GRID if tags.TEST_DICE in t else "")
    datasets = [f"`{i.dataset.name}` digest `{i.dataset.digest}`" for i in (run.inputs.dataset_inputs or [])]
    lines = [
        f"### {mv.name} v{mv.version}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test Dice ({grid or 'not evaluated yet'}) | {_fmt(t.get(tags.TEST_DICE))} |",
        f"| test HD95 (mm) | {_fmt(t.get(tags.TEST_HD95), 2)} |",
        f"| validation Dice (best epoch {rt.get(tags.BEST_EPOCH, '-')}) | {_fmt(rt.get(tags.BEST_VAL_DICE))} |",
        "",
        f"**Data**: DVC md5 `{rt.get(tags.DVC_STORE_MD5, 'untracked')}`, store digest "
        f"`{rt.get(tags.STORE_DIGEST, '-')[:16]}` at `{rt.get(tags.STORE_PATH, '-')}`; inputs: {', '.join(datasets) or '-'}.",
        "",
        "**Config** (all keys: the run's params and `config.json`): "
        + ", ".join(f"`{k}` = {p[k]}" for k in KEY_PARAMS if k in p),
        "",
        f"**Lineage**: training run `{run.info.run_id}` ({run.info.run_name}), git commit "
        f"`{rt.get(tags.GIT_COMMIT, 'unknown')}`, tuning search `{rt.get(tags.MLFLOW_PARENT_RUN_ID, '-')}`, "
        f"config hash `{rt.get(tags.CONFIG_HASH, '-')}`.",
        "",
        f"**Promotion**: {_promotion(t)}",
    ]
    return "\n".join(lines)


def _promotion(t: dict[str, str]) -> str:
    decision = t.get(tags.PROMOTION_DECISION)
    if not decision:
        return "not decided yet."
    who = t.get(tags.PROMOTED_BY) or t.get(tags.DECIDED_BY) or "-"
    return (
        f"{decision} by {who} at {t.get(tags.DECIDED_AT, '-')}: {t.get(tags.PROMOTION_REASON, '-')} "
        f"(compared with v{t.get(tags.COMPARED_WITH) or '-'}, test Dice {_fmt(t.get(tags.CHAMPION_TEST_DICE))})."
    )


def model_description(name: str, versions: list[Any], aliases: dict[str, Any]) -> str:
    """Markdown: what the model is, the promotion rule, and every version with its aliases and scores.

    `aliases`: {alias: version}, as the registered model holds them."""
    by_version: dict[str, list[str]] = {}
    for alias, v in sorted(aliases.items()):
        by_version.setdefault(str(v), []).append(alias)
    rows = [
        f"| v{v.version} | {', '.join(by_version.get(str(v.version), [])) or '-'} | {_fmt(v.tags.get(tags.TEST_DICE))} | "
        f"{_fmt(v.tags.get(tags.VAL_DICE))} | {v.tags.get(tags.PROMOTION_DECISION, '-')} |"
        for v in sorted(versions, key=lambda v: int(v.version), reverse=True)
    ]
    return "\n".join(
        [
            f"## {name}",
            "",
            "Liver segmentation of abdominal CT: a 2-D U-Net (segmentation-models-pytorch) on axial slices, "
            "3-D largest-component clean-up; input `{volume: (X, Y, Z) HU, affine: (4, 4)}`, output a uint8 "
            "mask on the input's grid.",
            "",
            f"Test Dice is the LiTS convention: mean over test volumes, on each volume's {TEST_GRID.split(',')[0]}. "
            "`@challenger` is the latest registered candidate; `@champion` moves only through `liverseg promote` "
            "(floor and margin over the champion).",
            "",
            "| version | aliases | test Dice | val Dice | promotion |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


def update_descriptions(client: Any, name: str, version: str) -> None:
    """Rewrite version `version`'s description and the registered model's."""
    mv = client.get_model_version(name, version)
    client.update_model_version(name, version, description=version_description(mv, client.get_run(mv.run_id)))
    versions = client.search_model_versions(f"name = '{name}'")
    aliases = client.get_registered_model(name).aliases
    client.update_registered_model(name, description=model_description(name, versions, aliases))
