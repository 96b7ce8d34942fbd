#!/usr/bin/env bash
# Stops what deploy/local/up.sh DIR started, by the PIDs it recorded (and their descendants, and Ray's
# processes under DIR/ray), and waits until none is left. Data under DIR stays for the next up.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
[ -d "$1" ] || { echo "down: error: $1: no such folder" >&2; exit 1; }
DIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${LIVERSEG_BIN:-$REPO/.venv/bin}/python
[ -x "$PY" ] || PY=python3
say() { echo "down: $*" >&2; }
pids_of() { cat "$DIR/pids/$1" 2>/dev/null || true; }

# PostgreSQL first by its own clean shutdown (checkpoint), then every recorded group and descendant.
if [ -s "$DIR/pids/postgres" ] && kill -0 "$(pids_of postgres)" 2>/dev/null; then
  say "stopping postgres"
  as_pg=(); [ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres --)
  pg_ctl=$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")")/pg_ctl
  "${as_pg[@]}" "$pg_ctl" -D "$DIR/pg/data" -m fast -w -t 30 stop >&2 || true
fi
roots=$(for s in mlflow s3 ray postgres; do pids_of "$s"; done)
for s in mlflow s3; do  # started with setsid: the PID is its process group
  for pid in $(pids_of "$s"); do kill -TERM -- "-$pid" 2>/dev/null && say "stopped $s (group $pid)" || true; done
done
targets=$("$PY" "$REPO/deploy/local/stackpids.py" "$DIR/ray" $roots)
[ -z "$targets" ] || kill -TERM $targets 2>/dev/null || true
for _ in $(seq 50); do  # up to 10 s for a clean exit, then SIGKILL
  left=$("$PY" "$REPO/deploy/local/stackpids.py" "$DIR/ray" $roots)
  [ -z "$left" ] && break
  sleep 0.2
done
if [ -n "$left" ]; then
  say "killing what did not exit: $(echo $left)"
  kill -KILL $left 2>/dev/null || true
  sleep 0.5
  left=$("$PY" "$REPO/deploy/local/stackpids.py" "$DIR/ray" $roots)
fi
[ -z "$left" ] || { echo "down: error: still running: $(echo $left)" >&2; exit 1; }
rm -f "$DIR"/pids/*
say "stopped; data kept in $DIR"
