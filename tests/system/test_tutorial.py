"""docs/tutorial.md, executed: its ```bash blocks, in order, in one shell on a clean copy of the repository."""

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.net import free_port
from support.paths import REPO
from support.raycluster import start_ray_head
from support.worktree import clone_worktree, user_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
# `make demo` is setup (the virtualenv, which this test already runs in) and then this script
MAKE = (
    'make() { [ "$1" = demo ] || { echo "make $*: not in the tutorial test" >&2; return 2; }; bash scripts/demo.sh; }\n'
)


def test_tutorial_blocks_run_in_order(tmp_path):
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / "docs" / "tutorial.md").read_text(), re.S | re.M)
    assert len(blocks) >= 8, "the tutorial lost its steps"
    repo = tmp_path / "clone"
    repo.mkdir()
    clone_worktree(repo)
    env = {**user_env(repo), "UI_PORT": str(free_port()), "SERVE_PORT": str(free_port())}
    # step 9's cluster: the one the tutorial tells a new user to start, on this machine, from the copy's code
    cluster = start_ray_head(Path(tempfile.mkdtemp(prefix="lsr-", dir="/tmp")), base_env=user_env(repo))
    try:
        # what step 9 tells the user to export, for the cluster above (only from step 9 on: the demo is local)
        exports = "export " + " ".join(f"{k}={v}" for k, v in cluster.env.items()) + "\n"
        submit = next(i for i, b in enumerate(blocks) if "--submit" in b)
        script = "set -euo pipefail\n" + MAKE + "\n".join(blocks[:submit] + [exports] + blocks[submit:])
        res = subprocess.run(
            ["bash", "-c", script],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-8000:]
    out = res.stdout
    assert "Ran experiment(s): narrow" in out and re.search(r"^(PROMOTED|KEPT): liver-unet", out, re.M), out[-4000:]
    case = re.search(r"logs/overlay-(\d+)\.png", out).group(1)
    assert (repo / "logs" / f"overlay-{case}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (repo / "logs" / f"mask-rest-{case}.nii.gz").stat().st_size > 0
    # step 9: the search ran on the cluster as a job, and its results stayed out of the checkout
    job = re.search(r"^submitted tune job (\S+) as ", out, re.M).group(1)
    assert re.search(rf"^job {job}: SUCCEEDED$", out, re.M), out[-4000:]
    assert re.search(r"^  trial \S+ epoch 2/2 ", out, re.M)
    run = re.search(r"^  MLflow: run (\w+) ", out, re.M).group(1)
    assert json.loads((repo / "tune-results.json").read_text())["parent_run_id"] != run
