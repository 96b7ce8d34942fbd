"""What a finished search leaves for people: the parent run's description and trials table in MLflow, plot
data for `dvc plots` (val_dice against each searched key; the best trial's training curves), the
terminal's table of trials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liverseg.core.files import atomic_write_json
from liverseg.tracking import tags
from liverseg.tracking.results import SearchResults

CURVES = ("train_loss", "val_loss", "val_dice")  # what `dvc plots show` draws per epoch


def _column(key: str) -> str:
    """`train.lr` -> `train_lr`: DVC reads dots in a field name as nesting."""
    return key.replace(".", "_")


def search_rows(summary: SearchResults) -> list[dict[str, Any]]:
    """One flat row per trial, best first: trial, status, epochs, val_dice and each searched key."""
    return [
        {
            "trial": t.trial_id,
            "status": t.status,
            "epochs": t.epochs,
            "val_dice": round(t.val_dice, 6) if t.scored else None,
            **{_column(k): v for k, v in t.params.items()},
        }
        for t in summary.trials
    ]


def describe_search(client: Any, summary: SearchResults) -> None:
    """The parent run's Markdown description (best trial first, then every trial) and an MLflow table."""
    rows = search_rows(summary)
    best = summary.best
    keys = sorted({k for t in summary.trials for k in t.params})
    params = ", ".join(f"`{k}` {best.params[k]:.4g}" for k in keys if isinstance(best.params.get(k), float))
    lines = [
        f"**Best trial** `{best.trial_id}`: {summary.metric} **{best.val_dice:.4f}** ({params}); run `{best.run_id}`.",
        "",
        f"Compare the trials: select them, **Compare**, *Parallel Coordinates Plot* with {', '.join(keys)} "
        "and `best_val_dice` (each trial logs its searched keys as params and its best epoch's score).",
        "",
        "| trial | status | epochs | val_dice | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for t in summary.trials:
        vals = [f"{t.params[k]:.4g}" if isinstance(t.params.get(k), float) else str(t.params.get(k)) for k in keys]
        dice = f"{t.val_dice:.4f}" if t.scored else "-"
        lines.append(f"| {t.trial_id} | {t.status} | {t.epochs} | {dice} | " + " | ".join(vals) + " |")
    client.set_tag(summary.parent_run_id, tags.MLFLOW_NOTE, "\n".join(lines))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    client.log_table(summary.parent_run_id, {c: [r.get(c) for r in rows] for c in columns}, "trials.json")


def write_dvc_plots(client: Any, summary: SearchResults, out_dir: str | Path) -> list[Path]:
    """`search.json` (one row per trial) and `curves.json` (the best trial's epochs) under out_dir."""
    out = Path(out_dir)
    search = out / "search.json"
    atomic_write_json(search, search_rows(summary))
    curves = out / "curves.json"
    rid = summary.best.run_id
    by_epoch: dict[int, dict[str, float]] = {}
    for key in CURVES if rid else ():
        for m in client.get_metric_history(rid, key):
            by_epoch.setdefault(m.step, {"epoch": m.step})[key] = round(m.value, 6)
    atomic_write_json(curves, [by_epoch[e] for e in sorted(by_epoch)])
    return [search, curves]


def format_table(summary: SearchResults) -> str:
    keys = sorted({k for t in summary.trials for k in t.params})
    head = ["trial", "status", "epochs", "val_dice", *keys, "mlflow run"]
    rows = [
        [
            t.trial_id,
            t.status,
            str(t.epochs),
            f"{t.val_dice:.4f}",
            *[
                f"{t.params.get(k, ''):.4g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, ""))
                for k in keys
            ],
            str(t.run_id),
        ]
        for t in summary.trials
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def best_line(summary: SearchResults, results: str) -> str:
    """The search's last line: the best trial that can be registered, where the results went, what next.
    TrainError when no trial logged a model (the first failure's cause in it)."""
    from liverseg.core.errors import TrainError

    best = summary.best
    if not best.model_uri:
        raise TrainError(f"no trial finished with a model; first failure: {best.error or 'none'}")
    return (
        f"best trial {best.trial_id}: val_dice {best.val_dice:.4f}, mlflow run {best.run_id}, "
        f"checkpoint {best.checkpoint}; results -> {results}; search run {summary.parent_run_id} "
        f"(liverseg register --best-of-tune-run {summary.parent_run_id})"
    )
