"""The repo's DVC ingest stage, run with `dvc repro` in a temporary git repo, plus a local remote."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.nifti import copy_case
from support.paths import REPO

BIN = Path(sys.executable).parent


def _run(cmd, cwd, **kw):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]} {res.stderr[-2000:]}"
    return res.stdout


def _ingest_repo(tmp_path, phantom_dir) -> Path:
    """A git + DVC repository with three phantom cases and the repo's ingest stage only."""
    repo = tmp_path / "repo"
    for n in ("0", "1", "2"):
        copy_case(phantom_dir, repo / "data" / "lits", n)
    shutil.copytree(REPO / "pipelines", repo / "pipelines")
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for f in (d for d in spec["stages"]["ingest"]["deps"] if d.startswith("platform/")):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, repo / f)
    spec["stages"] = {"ingest": spec["stages"]["ingest"]}
    spec.pop("plots", None)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.site_cache_dir", str(tmp_path / "site-cache")], repo)
    _run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    return repo


@pytest.mark.slow
def test_dvc_exp_run_set_param_takes_effect_over_the_profile(tmp_path, phantom_dir):
    """`dvc exp run -S pipelines/ingest.yaml:size=...` wins over the demo profile's size (stage file over
    profile), and `dvc exp show --json` has each experiment's numbers (metrics committed, not ignored)."""
    import json

    repo = _ingest_repo(tmp_path, phantom_dir)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run([*git, "add", "-A"], repo)
    _run([*git, "commit", "-qm", "baseline"], repo)
    for name, size in (("small", 32), ("mid", 48)):
        _run(["dvc", "exp", "run", "-q", "-n", name, "-S", f"pipelines/ingest.yaml:size=[{size},{size}]"], repo)
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo))
    exps = {e["name"]: e for rev in shown for e in rev.get("experiments") or []}  # under their baseline
    assert set(exps) == {"small", "mid"}, shown
    for name, size in (("small", 32), ("mid", 48)):
        data = exps[name]["revs"][0]["data"]
        metrics = data["metrics"]["metrics/ingest.json"]["data"]
        assert (metrics["height"], metrics["width"], metrics["cases"]) == (size, size, 3), metrics
        assert data["params"]["pipelines/ingest.yaml"]["data"]["size"] == [size, size]


@pytest.mark.slow
def test_dvc_repro_ingest_stage(tmp_path, phantom_dir):
    repo = _ingest_repo(tmp_path, phantom_dir)
    out = _run(["dvc", "repro"], repo)
    assert "Running stage 'ingest'" in out
    assert (repo / "data" / "store.zarr" / "zarr.json").exists()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    params = lock["stages"]["ingest"]["params"]
    assert "workers" in params["pipelines/ingest.yaml"] and params["pipelines/profile.yaml"]["profile"] == "demo"
    assert "demo.ingest" in params["pipelines/profiles.yaml"]
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo)
    assert "didn't change" in _run(["dvc", "repro"], repo)  # nothing re-runs
    from liverseg.data.store import SliceStore
    from liverseg.tracking.provenance import dvc_hash

    assert SliceStore(str(repo / "data" / "store.zarr")).size == (64, 64)  # the demo profile applied
    md5 = dvc_hash(repo / "data" / "store.zarr", repo / "dvc.lock")
    assert md5.endswith(".dir") and md5 == lock["stages"]["ingest"]["outs"][0]["md5"]
    _run(["dvc", "push", "-q"], repo)
    assert "in sync" in _run(["dvc", "status", "-c"], repo)
    shutil.rmtree(repo / "data" / "store.zarr")
    _run(["dvc", "pull", "-q"], repo)
    assert SliceStore(str(repo / "data" / "store.zarr")).verify() == {}


def test_repo_data_dvc_matches_the_demo_phantoms(tmp_path):
    """data.dvc's hash is what `liverseg synth` produces for the demo's seed (so a fresh clone is clean):
    the demo's phantoms are written and `dvc add` hashes them."""
    import re

    from liverseg.data.phantoms import write_phantoms

    args = re.search(
        r"--cases (\d+) --seed (\d+) --shape (\d+) (\d+) (\d+)", (REPO / "scripts" / "demo.sh").read_text()
    )
    cases, seed, *shape = (int(g) for g in args.groups())
    repo = tmp_path / "repo"
    write_phantoms(repo / "data" / "lits", cases, seed, tuple(shape))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.site_cache_dir", str(tmp_path / "site-cache")], repo)
    _run(["dvc", "add", "-q", "data/lits"], repo)
    ours, theirs = (yaml.safe_load(p.read_text())["outs"][0] for p in (REPO / "data.dvc", repo / "data" / "lits.dvc"))
    assert (ours["md5"], ours["nfiles"], ours["size"]) == (theirs["md5"], theirs["nfiles"], theirs["size"])


@pytest.mark.slow
def test_dvc_push_pull_round_trip_through_s3(tmp_path, phantom_dir, s3):
    """The team remote: `dvc push` to s3://lake/dvc on the shared object store, `dvc pull` into a clone."""
    import boto3

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    repo = tmp_path / "repo"
    copy_case(phantom_dir, repo / "data" / "lits", "0")
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.site_cache_dir", str(tmp_path / "site-cache")], repo)
    _run(["dvc", "remote", "add", "-d", "s3remote", f"{s3}/dvc"], repo)
    _run(["dvc", "remote", "modify", "s3remote", "endpointurl", endpoint], repo)
    _run(["dvc", "add", "-q", "data/lits"], repo)
    _run(["dvc", "push", "-q"], repo)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="lake", Prefix="dvc/")["Contents"]]
    assert len(keys) == 3  # the directory manifest and the two NIfTI files, content-addressed
    before = {p.name: p.read_bytes() for p in (repo / "data" / "lits").iterdir()}
    shutil.rmtree(repo / "data" / "lits")
    shutil.rmtree(repo / ".dvc" / "cache")
    _run(["dvc", "pull", "-q"], repo)
    assert {p.name: p.read_bytes() for p in (repo / "data" / "lits").iterdir()} == before
    assert "in sync" in _run(["dvc", "status", "-c"], repo)


PKG = REPO / "platform" / "liverseg"
# Files used by path rather than by import: training logs the model's MLflow flavour as a file.
FILE_REFERENCES = {"tracking.models": {"tracking.pyfunc"}}


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def _module(dotted: str) -> str | None:
    """'liverseg.data.lits' -> 'data.lits'; a package -> 'data.__init__'; None outside liverseg."""
    parts = dotted.split(".")
    if parts[0] != "liverseg":
        return None
    rel = "/".join(parts[1:])
    return ".".join(parts[1:]) if (PKG / f"{rel}.py").exists() else ".".join([*parts[1:], "__init__"]).lstrip(".")


def _imports(tree: ast.AST) -> set[str]:
    """liverseg modules imported anywhere in `tree` (function-level imports too), as 'room.module'."""
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "liverseg":
            for a in node.names:  # `from liverseg.tracking import tags` imports a module
                found.add(
                    _module(f"{node.module}.{a.name}")
                    if (PKG / node.module.split(".", 1)[-1].replace(".", "/") / f"{a.name}.py").exists()
                    else _module(node.module)
                )
        elif isinstance(node, ast.Import):
            found |= {_module(a.name) for a in node.names if a.name.startswith("liverseg.")}
    return found - {None}


def _with_packages(modules: set[str]) -> set[str]:
    """Importing room.module runs liverseg/__init__.py and room/__init__.py first: they are deps too."""
    out = set(modules) | {"__init__"}
    for m in modules:
        parts = m.split(".")[:-1]
        out |= {".".join([*parts[: k + 1], "__init__"]) for k in range(len(parts))}
    return out


def _source(module: str) -> Path:
    return PKG / f"{module.replace('.', '/')}.py"


def _stage_modules(subcommand: str) -> set[str]:
    """Every liverseg module the `liverseg <subcommand>` entry reaches: the command function's imports,
    then the static import graph from there (the cli room itself, the thin wrapper, is left out)."""
    functions = {}
    for f in (PKG / "cli").glob("*.py"):
        functions |= {n.name: n for n in ast.parse(f.read_text()).body if isinstance(n, ast.FunctionDef)}
    entry = next(f for name, f in functions.items() if name.replace("_", "-") == subcommand)
    funcs, stack = {entry.name}, [entry]  # the entry and the cli helpers it calls (e.g. quietly)
    while stack:
        for node in ast.walk(stack.pop()):
            if isinstance(node, ast.Name) and node.id in functions and node.id not in funcs:
                funcs.add(node.id)
                stack.append(functions[node.id])
    todo, seen = set().union(*(_imports(functions[f]) for f in funcs)), set()
    while todo:
        m = todo.pop()
        if m in seen or m.startswith("cli"):
            continue
        seen.add(m)
        todo |= _imports(ast.parse(_source(m).read_text())) | FILE_REFERENCES.get(m, set())
    return _with_packages(seen)


def test_dvc_stage_deps_are_exactly_the_modules_each_stage_imports():
    """Editing a module re-runs exactly the stages that import it: no module missing, none extra."""
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        subcommand = stage["cmd"].split()[1]
        listed = {d for d in stage.get("deps", []) if d.startswith("platform/")}
        derived = {_source(m).relative_to(REPO).as_posix() for m in _stage_modules(subcommand)}
        assert listed == derived, f"{name}: missing {sorted(derived - listed)}, extra {sorted(listed - derived)}"
