#!/usr/bin/env bash
# Stops what deploy/local/up.sh DIR started; the data stays for the next up: deploy/local/stack.py down.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=$here/../../.venv/bin/python
[ -x "$py" ] || py=python3
exec "$py" "$here/stack.py" down "$@"
