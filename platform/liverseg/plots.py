"""PNG figures logged to MLflow: training curves and validation overlays (ground truth vs prediction)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless; chosen here, not at import of liverseg
    import matplotlib.pyplot as plt

    return plt


def curves_png(series: dict[str, list[tuple[int, float]]], out: str | Path) -> None:
    """One line per metric over epochs: {name: [(epoch, value), ...]}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def overlay_png(lm, store, cases: list[str], out: str | Path) -> None:
    """For each case, the slice with most liver: CT (HU window), ground truth (green), prediction (red)."""
    from liverseg.inference import liver_probability

    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(cases), 1), figsize=(3.2 * max(len(cases), 1), 3.4), squeeze=False)
    lo, hi = lm.meta["window"]
    for ax, case in zip(axes[0], cases):
        img, msk = store.volume(case)
        z = int(np.argmax((msk >= 1).sum((1, 2))))
        window = slice(max(z - 1, 0), min(z + 2, len(img)))
        prob = liver_probability(lm, img[window]).cpu().numpy()[z - window.start]
        ax.imshow(img[z], cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.contour(msk[z] >= 1, levels=[0.5], colors="lime", linewidths=1)
        ax.contour(prob > 0.5, levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"case {case} z={z}", fontsize=9)
        ax.axis("off")
    fig.suptitle("green: ground truth, red: prediction", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
