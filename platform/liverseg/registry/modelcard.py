"""The registry's Markdown descriptions: one for the registered model, one per version (MLflow shows both
on the model's and the version's page).

A card is rebuilt from what the registry and the training run hold (tags, params, inputs), so it is
never out of step with them: `update_descriptions` runs after anything changes them (registration, an
evaluation, a promotion decision, every champion change). Text that users wrote (reasons, names,
paths, run names) is escaped, so it shows as text and never as Markdown, HTML or a link; every card
stays under MLflow's 5,000-character description column whatever the number of versions.
"""

from __future__ import annotations

import re
from typing import Any

from liverseg.core.limits import MLFLOW_DESCRIPTION_CHARS
from liverseg.tracking import tags
from liverseg.tracking.chain import history_head

TEST_GRID = "original grid, per volume (LiTS)"  # the one test Dice; a store-grid figure says so
KEY_PARAMS = ("model.encoder", "model.encoder_weights", "train.epochs", "train.batch_size", "train.lr")
KEY_PARAMS += ("loss.dice_weight", "loss.ce_weight", "data.window")
MAX_ROWS = 20  # versions listed on the model's card, newest first (aliased ones always): the rest in the Versions tab
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]#!|~<>&])")  # emphasis, code, links, images, tables, HTML


def md(text: Any, limit: int = 300) -> str:
    """User text as literal Markdown: one line, every Markdown/HTML character escaped, at most `limit`
    characters of it (a longer text ends in '...')."""
    s = " ".join(str(text).split())
    s = s if len(s) <= limit else s[: limit - 3] + "..."
    s = "".join(c for c in s if c.isprintable())
    s = _MD_SPECIAL.sub(r"\\\1", s).replace("://", ":\\/\\/").replace("www.", "www\\.")  # no autolinks
    return s or "-"


def code(text: Any, limit: int = 80) -> str:
    """User text as an inline code span: one line, no backticks (which would close the span), at most
    `limit` characters; inside a code span nothing is Markdown."""
    s = "".join(c for c in " ".join(str(text).split()) if c.isprintable() and c != "`")
    return f"`{s if len(s) <= limit else s[: limit - 3] + '...'}`" if s else "-"


def _fmt(v: Any, digits: int = 4) -> str:
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return md(v) if v not in (None, "") else "-"


def _score(t: dict[str, str]) -> tuple[str, str]:
    """(the gate's test Dice, its grid): the LiTS figure, else the store-grid one, labelled."""
    if t.get(tags.TEST_DICE):
        return t[tags.TEST_DICE], t.get(tags.TEST_DICE_GRID) or TEST_GRID
    if t.get(tags.TEST_DICE_STORE_GRID):
        return t[tags.TEST_DICE_STORE_GRID], "store grid, not LiTS"
    return "", ""


def _fit(lines: list[str], limit: int = MLFLOW_DESCRIPTION_CHARS) -> str:
    text = "\n".join(lines)
    return text if len(text) <= limit else text[: limit - 40].rsplit("\n", 1)[0] + "\n\n(card shortened to fit)"


def version_description(mv: Any, run: Any) -> str:
    """Markdown: scores (test on the LiTS grid, validation), the gate, data, config, lineage, promotion."""
    t, rt, p = mv.tags or {}, run.data.tags, run.data.params
    dice, grid = _score(t)
    datasets = [
        f"{code(i.dataset.name)} digest {code(i.dataset.digest, 40)}" for i in (run.inputs.dataset_inputs or [])
    ]
    lines = [
        f"### {md(mv.name)} v{mv.version}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test Dice ({md(grid) if grid else 'not evaluated yet'}) | {_fmt(dice)} |",
        f"| test HD95 (mm) | {_fmt(t.get(tags.TEST_HD95), 2)} |",
        f"| validation Dice (best epoch {md(rt.get(tags.BEST_EPOCH, '-'))}) | {_fmt(rt.get(tags.BEST_VAL_DICE))} |",
        "",
        _gate(t),
        "",
        f"**Data**: DVC md5 {code(rt.get(tags.DVC_STORE_MD5, 'untracked'), 64)}, store digest "
        f"{code(rt.get(tags.STORE_DIGEST, '-')[:16])} at {code(rt.get(tags.STORE_PATH, '-'), 200)}; "
        f"inputs: {', '.join(datasets[:6]) or '-'}.",
        "",
        "**Config** (all keys: the run's params and `config.json`): "
        + ", ".join(f"`{k}` = {code(p[k], 60)}" for k in KEY_PARAMS if k in p),
        "",
        f"**Lineage**: training run {code(run.info.run_id)} ({md(run.info.run_name, 80)}), git commit "
        f"{code(rt.get(tags.GIT_COMMIT, 'unknown'), 64)}, tuning search {code(rt.get(tags.MLFLOW_PARENT_RUN_ID, '-'), 64)}, "
        f"config hash {code(rt.get(tags.CONFIG_HASH, '-'), 64)}.",
        "",
        f"**Promotion**: {_promotion(t)}",
    ]
    return _fit(lines)


def _gate(t: dict[str, str]) -> str:
    rule = t.get(tags.GATE_RULE)
    if not rule:
        return "**Gate**: not run yet."
    if not t.get(tags.GATE_DIFF_MEAN):
        return f"**Gate**: rule {code(rule)} over {md(t.get(tags.GATE_N_CASES, '-'))} cases (no champion to pair with)."
    return (
        f"**Gate**: rule {code(rule)}, margin {_fmt(t.get(tags.GATE_MARGIN))}: paired Dice difference "
        f"{_fmt(t.get(tags.GATE_DIFF_MEAN))}, {_fmt(t.get(tags.GATE_CONFIDENCE), 2)} CI "
        f"[{_fmt(t.get(tags.GATE_DIFF_CI_LOW))}, {_fmt(t.get(tags.GATE_DIFF_CI_HIGH))}] over "
        f"{md(t.get(tags.GATE_N_CASES, '-'))} cases (bootstrap, {md(t.get(tags.GATE_RESAMPLES, '-'))} resamples, "
        f"seed {md(t.get(tags.GATE_SEED, '-'))}); Wilcoxon signed-rank p = {_fmt(t.get(tags.GATE_P_VALUE))}."
    )


def _promotion(t: dict[str, str]) -> str:
    decision = t.get(tags.PROMOTION_DECISION)
    if not decision:
        return "not decided yet."
    champion = ""
    if t.get(tags.CHAMPION_AT):
        champion = (
            f" Champion since {md(t[tags.CHAMPION_AT])} by {md(t.get(tags.CHAMPION_BY, '-'))}: "
            f"{md(t.get(tags.CHAMPION_REASON) or '-')} (history record {md(t.get(tags.HISTORY_SEQ, '-'))})."
        )
    return (
        f"{md(decision)} by {md(t.get(tags.DECIDED_BY) or '-')} at {md(t.get(tags.DECIDED_AT, '-'))}: "
        f"{md(t.get(tags.PROMOTION_REASON, '-'))} (compared with v{md(t.get(tags.COMPARED_WITH) or '-')}, "
        f"test Dice {_fmt(t.get(tags.CHAMPION_TEST_DICE))}).{champion}"
    )


def model_description(name: str, versions: list[Any], aliases: dict[str, Any], warning: str = "") -> str:
    """Markdown: what the model is, the promotion rule, and its newest versions (and every aliased one)
    with their aliases and scores. `aliases`: {alias: version}; `warning`: a bypass to show on top."""
    by_version: dict[str, list[str]] = {}
    for alias, v in sorted(aliases.items()):
        by_version.setdefault(str(v), []).append(alias)
    ordered = sorted(versions, key=lambda v: int(v.version), reverse=True)
    shown = [v for i, v in enumerate(ordered) if i < MAX_ROWS or str(v.version) in by_version]
    rows = [
        f"| v{v.version} | {', '.join(md(a, 40) for a in by_version.get(str(v.version), [])) or '-'} | "
        f"{_fmt(_score(v.tags or {})[0])} | {_fmt((v.tags or {}).get(tags.VAL_DICE))} | "
        f"{md((v.tags or {}).get(tags.PROMOTION_DECISION, '-'), 20)} |"
        for v in shown
    ]
    more = len(ordered) - len(shown)
    lines = [f"## {md(name)}", ""]
    if warning:
        lines += [f"**Warning**: {md(warning, 600)}", ""]
    lines += [
        "Liver segmentation of abdominal CT: a 2-D U-Net (segmentation-models-pytorch) on axial slices, "
        "3-D largest-component clean-up; input `{volume: (X, Y, Z) HU, affine: (4, 4)}`, output a uint8 "
        "mask on the input's grid.",
        "",
        f"Test Dice is the LiTS convention: mean over test volumes, on each volume's {TEST_GRID.split(',')[0]}. "
        "`@challenger` is the latest registered candidate; `@champion` moves only through `liverseg promote` "
        "(a floor, then a paired bootstrap interval of the per-case Dice differences against the champion) "
        "and `liverseg rollback`, each recorded in the hash-chained `liverseg.history.*` tags.",
        "",
        "| version | aliases | test Dice | val Dice | promotion |",
        "|---|---|---|---|---|",
        *rows,
    ]
    if more:
        lines += ["", f"{more} older versions: see the Versions tab."]
    return _fit(lines)


def _bypass(client: Any, name: str, model: Any) -> str:
    """A line when `name`'s champion is not where its history put it ("" otherwise, or without a champion)."""
    from liverseg.tracking.gate_marks import served_by_gate

    if tags.CHAMPION not in (model.aliases or {}):
        return ""
    champion = client.get_model_version(name, str(model.aliases[tags.CHAMPION]))
    head = history_head(model.tags or {}, tags.HISTORY_PREFIX)
    if head is None and not any(k.startswith(tags.HISTORY_PREFIX) for k in model.tags or {}):
        return ""  # a model liverseg never promoted into
    return served_by_gate(champion, head) or ""


def update_descriptions(client: Any, name: str, version: str) -> None:
    """Rewrite version `version`'s card and the registered model's."""
    mv = client.get_model_version(name, version)
    run = client.get_run((mv.tags or {}).get(tags.TRAINING_RUN_ID) or mv.run_id)
    client.update_model_version(name, version, description=version_description(mv, run))
    model = client.get_registered_model(name)
    versions = client.search_model_versions(f"name = '{name}'")
    text = model_description(name, versions, model.aliases or {}, _bypass(client, name, model))
    client.update_registered_model(name, description=text)
