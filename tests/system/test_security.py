"""Security checks that need no running service: no secrets in the repo.

Loading models without running stored code: `test_artifact.py`; serving on loopback by default:
`test_serve.py`."""

import re
import subprocess
from pathlib import Path

from support.paths import REPO


def test_no_credentials_committed():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    pattern = re.compile(
        r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|(password|secret)[\"']?\s*[:=]\s*[\"'][^\"'$\s]{8,})", re.I
    )
    hits = [
        f
        for f in files
        if Path(REPO / f).is_file()
        and Path(REPO / f).stat().st_size < 1_000_000
        and pattern.search((REPO / f).read_text(errors="ignore"))
    ]
    assert hits == [], hits
