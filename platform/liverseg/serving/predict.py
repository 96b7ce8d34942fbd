"""Predict: CT volumes (one file or a folder) -> uint8 liver masks, nothing overwritten unasked.

Every input and output is planned and checked before the model is loaded (seconds saved on a typo):
inputs exist and are readable, no output is an input, no two inputs map to one output (`x.nii` and
`x.nii.gz`), an existing output needs `overwrite`, outputs can be created. In a folder run an entry that
cannot be read (a symlink loop or a dangling link, a folder or a FIFO with a NIfTI name, no permission)
is one failure among the others; the run then goes on past any failing file, whatever it raises, and
reports what was really written.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liverseg.core.errors import PredictError, one_line
from liverseg.data.lits import NAME as LITS_NAME
from liverseg.data.lits import SUFFIXES, segmentation_name


@dataclass
class Job:
    src: Path
    dst: Path
    error: str | None = None  # why `src` cannot be read: the job fails without reading, the others run


def _real(path: Path) -> Path:
    """The path with every symlink resolved; a loop stays as it is (Path.resolve raises on one)."""
    return Path(os.path.realpath(path))


def _unreadable(path: Path) -> str | None:
    """Why `path` is not a readable regular file (one line naming it), or None."""
    try:
        mode = path.stat().st_mode  # follows links: a loop or a dangling link fails here
    except OSError as e:
        return f"{path}: {e.strerror or one_line(e)}"
    if stat.S_ISDIR(mode):
        return f"{path}: is a folder, not a NIfTI file"
    if not stat.S_ISREG(mode):
        return f"{path}: not a regular file (a FIFO, socket or device)"
    return None if os.access(path, os.R_OK) else f"{path}: not readable (permission denied)"


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # input path -> one-line reason
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, summed over files


def _entries(src: Path) -> list[Path]:
    """The folder's NIfTI-named entries, whatever they are (files, links, folders), sorted."""
    try:
        return sorted(p for p in src.iterdir() if p.name.endswith(SUFFIXES))
    except OSError as e:
        raise PredictError(f"{src}: cannot list this folder ({e.strerror or one_line(e)})") from None


def _inputs(src: Path) -> list[Path]:
    """The volumes of a folder run: NIfTI-named entries but ground truth (`segmentation-*`) and hidden ones."""
    files = [p for p in _entries(src) if not p.name.startswith(("segmentation-", "."))]
    if not files:
        raise PredictError(f"{src}: no .nii / .nii.gz volumes in this folder")
    return files


def plan(
    src: Path, dst: Path, overwrite: bool = False, overlay: Path | None = None, truth: Path | None = None
) -> list[Job]:
    """Map inputs to outputs and check them all; raises PredictError before anything is read or written."""
    if not src.exists():
        raise PredictError(f"{src}: no such file or folder")
    if src.is_dir():
        if overlay or truth:
            raise PredictError(f"{src}: --overlay and --truth take a single file, not a folder")
        if dst.exists() and not dst.is_dir():
            raise PredictError(f"{dst}: exists and is not a folder (the input is a folder)")
        jobs = [Job(f, dst / segmentation_name(f.name), _unreadable(f)) for f in _inputs(src)]
    else:
        if dst.is_dir():
            raise PredictError(
                f"{dst}: is a folder; give the mask's file name (e.g. {dst / segmentation_name(src.name)})"
            )
        jobs = [Job(src, dst)]
    for path in ([] if src.is_dir() else [src]) + ([truth] if truth else []):
        if _unreadable(path):
            raise PredictError(f"{path}: not a readable file")
    outputs = [j.dst for j in jobs if not j.error] + ([overlay] if overlay else [])
    _check_outputs(outputs, _protected(src, [j.src for j in jobs] + ([truth] if truth else [])), overwrite)
    return jobs


def _protected(src: Path, inputs: list[Path]) -> set[Path]:
    """Resolved paths that are never an output: every file read, and in a folder run each NIfTI file of
    the folder (`segmentation-N`, skipped rather than read, is the ground truth of its volume)."""
    folder = _entries(src) if src.is_dir() else []
    return {_real(p) for p in inputs + folder}


def _ground_truth(path: Path) -> str | None:
    """The `volume-N` beside `segmentation-N.nii[.gz]` when a segmentation-N of either suffix exists there
    (its ground truth, in any folder: replaced, or doubled into a pair ingest refuses), else None."""
    m = LITS_NAME.match(path.name)
    if (
        not m
        or m[1] != "segmentation"
        or not any(path.with_name(f"segmentation-{m[2]}{ext}").is_file() for ext in SUFFIXES)
    ):
        return None
    return next((v.name for ext in SUFFIXES if (v := path.with_name(f"volume-{m[2]}{ext}")).exists()), None)


def _check_outputs(outputs: list[Path], protected: set[Path], overwrite: bool) -> None:
    """Outputs never replace an input or ground truth (whatever `overwrite` says), a folder, or each other."""
    seen: dict[Path, Path] = {}
    for out in outputs:
        key = _real(out)
        volume = _ground_truth(key)
        if volume:
            raise PredictError(f"{out}: is LiTS ground truth (of {volume} beside it); choose another output")
        if key in protected:
            raise PredictError(f"{out}: is an input; choose another output")
        if key in seen:
            raise PredictError(f"{seen[key]} and {out}: two outputs with one name; rename an input")
        seen[key] = out
        if out.exists() and not out.is_file():
            raise PredictError(f"{out}: exists and is not a file (a folder?); choose a file name")
        if out.exists() and not overwrite:
            raise PredictError(f"{out}: exists; give --overwrite to replace it")
    for parent in {o.parent for o in outputs}:
        _check_creatable(parent)


def _check_creatable(folder: Path) -> None:
    """The folder exists and is writable, or can be created (its nearest existing ancestor is)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PredictError(f"{folder}: cannot create (a path component, {probe}, is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PredictError(f"{probe}: not writable")


def predict_jobs(
    lm: Any,
    jobs: list[Job],
    lcc: bool = True,
    overwrite: bool = False,
    overlay: Path | None = None,
    truth: Path | None = None,
    progress: bool = False,
) -> PredictReport:
    """Run planned jobs; a failing file (any exception) is recorded and the next one runs."""
    import sys

    from tqdm import tqdm

    from liverseg.core.errors import InputError
    from liverseg.model.inference import predict_file

    report = PredictReport()
    for job in tqdm(jobs, desc="predict", unit="vol", file=sys.stderr, disable=not progress):
        if job.error:
            report.failed[str(job.src)] = job.error
            continue
        if job.dst.exists() and not overwrite:  # appeared since planning
            report.failed[str(job.src)] = f"{job.dst}: exists; give --overwrite to replace it"
            continue
        try:
            t = predict_file(lm, job.src, job.dst, lcc, overlay, truth)
        except InputError as e:
            report.failed[str(job.src)] = str(e)
        except OSError as e:
            report.failed[str(job.src)] = f"{e.filename or job.dst}: cannot write ({e.strerror or one_line(e)})"
        except Exception as e:  # one bad volume never stops the others
            report.failed[str(job.src)] = f"{job.src.name}: {one_line(e)}"
        else:
            report.written.append(job.dst)
            for k, v in t.items():
                report.timings[k] = report.timings.get(k, 0.0) + v
    return report
