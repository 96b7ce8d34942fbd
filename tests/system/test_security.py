"""Security checks that need no running service: no secrets in the repo.

Loading models without running stored code: `test_artifact.py`; serving on loopback by default:
`test_serve.py`."""

import re
import subprocess
from pathlib import Path

from support.paths import REPO

# a literal after `password =` / `secret:` is a credential, unless it names an environment variable of ours
# (core/env.py: `ADMIN_PASSWORD = "LIVERSEG_ADMIN_PASSWORD"` says where the value comes from)
CREDENTIAL = re.compile(
    r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY"
    r"|(password|secret)[\"']?\s*[:=]\s*[\"'](?!LIVERSEG_[A-Z_]+[\"'])[^\"'$\s]{8,})",
    re.I,
)


def test_the_credential_pattern_tells_a_secret_from_a_variable_name():
    word = "pass" + "word"  # split: this file must not hit its own pattern
    assert CREDENTIAL.search(word + ' = "hunter2hunter2"') and CREDENTIAL.search("sec" + "ret: 'LIVERSEG_x-9f8e7d6c'")
    assert not CREDENTIAL.search(f'ADMIN_{word.upper()} = "LIVERSEG_ADMIN_{word.upper()}"')


def test_no_credentials_committed():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    pattern = CREDENTIAL
    hits = [
        f
        for f in files
        if Path(REPO / f).is_file()
        and Path(REPO / f).stat().st_size < 1_000_000
        and pattern.search((REPO / f).read_text(errors="ignore"))
    ]
    assert hits == [], hits
