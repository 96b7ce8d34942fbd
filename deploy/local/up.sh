#!/usr/bin/env bash
# The team stack on 127.0.0.1 with all state under DIR: deploy/local/stack.py up (see its docstring).
#   set -a; eval "$(deploy/local/up.sh DIR)"; set +a
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=$here/../../.venv/bin/python
[ -x "$py" ] || py=python3
exec "$py" "$here/stack.py" up "$@"
