"""PNG figures logged to MLflow: training curves and validation overlays (ground truth vs prediction)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from liverseg.core.files import atomic_write_bytes
from liverseg.model.artifact import LoadedModel, liver_probability


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


def overlay_png(lm: LoadedModel, store, cases: list[str], out: str | Path) -> None:
    """For each case, the slice with most liver: CT (HU window), ground truth (green), prediction (red)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(cases), 1), figsize=(3.2 * max(len(cases), 1), 3.4), squeeze=False)
    lo, hi = lm.spec.window
    for ax, case in zip(axes[0], cases):
        img, msk = store.volume(case)
        z = int(np.argmax((msk >= 1).sum((1, 2))))
        window = slice(max(z - 1, 0), min(z + 2, len(img)))
        prob = liver_probability(lm, img[window]).cpu().numpy()[z - window.start]
        # [:, ::-1]: radiological convention, as in `mask_overlay_png`
        ax.imshow(img[z][:, ::-1], cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.contour((msk[z] >= 1)[:, ::-1], levels=[0.5], colors="lime", linewidths=1)
        ax.contour((prob > 0.5)[:, ::-1], levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"case {case} z={z}", fontsize=9)
        ax.axis("off")
    fig.suptitle("green: ground truth, red: prediction", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def mask_overlay_png(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    window: tuple[float, float],
    out: str | Path,
    truth: np.ndarray | None = None,
    title: str = "",
) -> tuple[int, int]:
    """Axial slice with the most predicted liver and the coronal slice through its centre; returns (z, y).

    image: (Z, Y, X) HU, canonical RAS+; mask and truth: (Z, Y, X), liver where >= 1; spacing: (x, y, z) mm,
    used for the aspect ratio so that anisotropic volumes are not squashed. Prediction red, truth green.
    """
    plt = _pyplot()
    liver = mask >= 1
    z = int(np.argmax(liver.sum((1, 2))))
    y = int(np.round(np.nonzero(liver[z])[0].mean())) if liver[z].any() else image.shape[1] // 2
    cuts = [
        ("axial", np.s_[z], spacing[1] / spacing[0], f"z={z}"),
        ("coronal", np.s_[:, y], spacing[2] / spacing[0], f"y={y}"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, (name, cut, aspect, where) in zip(axes, cuts):
        # [..., ::-1]: radiological convention, the patient's right (+x in RAS) on the viewer's left
        ax.imshow(image[cut][..., ::-1], cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
        for labels, colour in ((truth, "lime"), (mask, "red")):
            if labels is not None and (labels[cut] >= 1).any():
                ax.contour((labels[cut] >= 1)[..., ::-1], levels=[0.5], colors=colour, linewidths=1)
        ax.set_title(f"{name} {where}", fontsize=9)
        ax.axis("off")
    legend = "red: prediction" + ("" if truth is None else ", green: ground truth")
    fig.suptitle(f"{title}  ({legend})" if title else legend, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return z, y
