"""docs/tutorial.md, executed: its ```bash blocks, in order, in one shell on a clean copy of the repository."""

import re
import subprocess

import pytest

from support.net import free_port
from support.paths import REPO
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
    script = "set -euo pipefail\n" + MAKE + "\n".join(blocks)
    res = subprocess.run(
        ["bash", "-c", script], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert res.returncode == 0, res.stdout[-8000:]
    out = res.stdout
    assert "Ran experiment(s): narrow" in out and re.search(r"^(PROMOTED|KEPT): liver-unet", out, re.M), out[-4000:]
    case = re.search(r"logs/overlay-(\d+)\.png", out).group(1)
    assert (repo / "logs" / f"overlay-{case}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (repo / "logs" / f"mask-rest-{case}.nii.gz").stat().st_size > 0
