#!/usr/bin/env bash
# The team stack on one machine, every server on 127.0.0.1, all state under DIR:
#   PostgreSQL (MLflow's backend store and its basic-auth database), an S3 server (moto), an MLflow
#   tracking server (basic-auth, artifacts proxied into the bucket), a two-node Ray cluster.
# Usage: deploy/local/up.sh DIR    then    set -a; eval "$(deploy/local/up.sh DIR)"; set +a
# Prints KEY=VALUE lines on stdout (whoever runs it is the admin); progress goes to stderr. They are kept
# in two files, both mode 0600: DIR/stack.env, what every team member needs (share that one), and
# DIR/admin.env, the admin password and the webhook secret (stays with the admin).
# Running it again on the same DIR reuses the data (database, bucket, admin password); when the stack
# is already up it only prints the lines again. deploy/local/down.sh DIR stops what this started.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
umask 077
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
say() { echo "up: $*" >&2; }
die() { echo "up: error: $*" >&2; exit 1; }

# Unix sockets (PostgreSQL's, Ray's) live under DIR; their paths must stay under 108 bytes.
[ ${#DIR} -le 48 ] || die "$DIR: path longer than 48 characters (Unix socket paths under it would be too long); use a shorter folder, e.g. under /tmp"
BIN=${LIVERSEG_BIN:-$REPO/.venv/bin}
[ -x "$BIN/mlflow" ] || BIN=$(dirname "$(command -v mlflow || echo /nonexistent/mlflow)")
[ -x "$BIN/mlflow" ] && [ -x "$BIN/ray" ] && [ -x "$BIN/moto_server" ] \
  || die "mlflow, ray and moto_server not found in $REPO/.venv/bin or on PATH (run make setup, or set LIVERSEG_BIN)"
PY=$BIN/python
PGBIN=$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")")
[ -x "$PGBIN/initdb" ] || die "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"

mkdir -p "$DIR/pids" "$DIR/logs"
alive() {  # NAME: any PID recorded for it still running
  local pid
  [ -s "$DIR/pids/$1" ] || return 1
  while read -r pid; do kill -0 "$pid" 2>/dev/null && return 0; done <"$DIR/pids/$1"
  return 1
}
running=0; for s in postgres s3 mlflow ray; do alive "$s" && running=$((running + 1)); done
if [ "$running" = 4 ] && [ -s "$DIR/stack.env" ] && [ -s "$DIR/admin.env" ]; then
  say "already running"; cat "$DIR/stack.env" "$DIR/admin.env"; exit 0
fi
[ "$running" = 0 ] || die "$DIR: part of a stack is still running; run deploy/local/down.sh $DIR first"

# A start that fails half-way stops what it had started.
trap 'rc=$?; [ $rc = 0 ] || { say "stopping what was started"; "$REPO/deploy/local/down.sh" "$DIR" >&2 || true; }' EXIT
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))'; }
wait_http() {  # URL SECONDS: until the URL answers at all (any HTTP status)
  "$PY" - "$1" "$2" <<'EOF' || die "$1 did not answer within $2 s (see $DIR/logs)"
import sys, time, urllib.error, urllib.request
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except Exception:
        time.sleep(0.3)
sys.exit(1)
EOF
}
start_bg() {  # NAME CMD...: own session (down kills the group), PID recorded
  local name=$1; shift
  setsid "$@" >"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/pids/$name"
}

# Secrets: generated on the first start, kept under DIR (0600), never in the repository.
if [ ! -s "$DIR/secrets.env" ]; then
  {
    echo "PG_PASSWORD=$(secret)"
    echo "ADMIN_PASSWORD=$(secret)"
    echo "S3_KEY_ID=liverseg-$(secret | cut -c1-8)"
    echo "S3_SECRET=$(secret)"
    echo "WEBHOOK_SECRET=$(secret)"
    echo "FLASK_SECRET=$(secret)"
    echo "WEBHOOK_KEY=$("$PY" -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())')"
  } >"$DIR/secrets.env.tmp"
  mv "$DIR/secrets.env.tmp" "$DIR/secrets.env"
fi
# shellcheck disable=SC1091
. "$DIR/secrets.env"
BUCKET=liverseg
PG_PORT=$(free_port); S3_PORT=$(free_port); MLFLOW_PORT=$(free_port)

# PostgreSQL: initdb refuses to run as root, so as root the server runs as the `postgres` user.
AS_PG=()
if [ "$(id -u)" = 0 ]; then
  AS_PG=(runuser -u postgres --)
  chmod 711 "$DIR"  # postgres may pass through DIR (not list it) to reach DIR/pg
fi
mkdir -p "$DIR/pg"
[ "$(id -u)" = 0 ] && chown postgres "$DIR/pg"
if [ ! -s "$DIR/pg/data/PG_VERSION" ]; then
  say "initdb $DIR/pg/data"
  printf '%s\n' "$PG_PASSWORD" >"$DIR/pg/pwfile"
  [ "$(id -u)" = 0 ] && chown postgres "$DIR/pg/pwfile"
  "${AS_PG[@]}" "$PGBIN/initdb" -D "$DIR/pg/data" -U postgres --auth=scram-sha-256 --pwfile="$DIR/pg/pwfile" \
    >"$DIR/logs/initdb.log" 2>&1 || die "initdb failed (see $DIR/logs/initdb.log)"
  rm -f "$DIR/pg/pwfile"
fi
say "postgres on 127.0.0.1:$PG_PORT"
"${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$DIR/pg/data" -w -t 60 -l "$DIR/pg/server.log" \
  -o "-h 127.0.0.1 -p $PG_PORT -k $DIR/pg" start >"$DIR/logs/pg_ctl.log" 2>&1 \
  || die "PostgreSQL did not start (see $DIR/pg/server.log)"
head -1 "$DIR/pg/data/postmaster.pid" >"$DIR/pids/postgres"
for db in mlflow mlflow_auth; do
  PGPASSWORD=$PG_PASSWORD "$PGBIN/psql" -qtA -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
    -c "select 1 from pg_database where datname = '$db'" | grep -q 1 \
    || PGPASSWORD=$PG_PASSWORD "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$db"
done

# S3 (moto keeps objects in memory: every request is recorded under DIR/s3 and replayed on the next up).
mkdir -p "$DIR/s3"
say "s3 on 127.0.0.1:$S3_PORT"
start_bg s3 env MOTO_ENABLE_RECORDING=true MOTO_RECORDER_FILEPATH="$DIR/s3/requests.jsonl" \
  "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
wait_http "http://127.0.0.1:$S3_PORT/moto-api/" 30
if [ -s "$DIR/s3/requests.jsonl" ]; then
  say "s3: replaying $(wc -l <"$DIR/s3/requests.jsonl") recorded requests"
  "$PY" -c "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1], method='POST'), timeout=600)" \
    "http://127.0.0.1:$S3_PORT/moto-api/recorder/replay-recording"
fi
AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ACCESS_KEY_ID=$S3_KEY_ID AWS_SECRET_ACCESS_KEY=$S3_SECRET \
  "$PY" -c "
import boto3, sys
s3 = boto3.client('s3', region_name='us-east-1')
if sys.argv[1] not in [b['Name'] for b in s3.list_buckets()['Buckets']]:
    s3.create_bucket(Bucket=sys.argv[1])
" "$BUCKET"

# Ray: two nodes (head + one more), own temp dir so nobody else's ray.init() attaches to it.
say "ray: two nodes"
# Logical CPUs per node: 2, so that a Tune trial's driver (0.01 CPU) and its 1-CPU Train worker fit on
# one node; with 1 per node, two searches' drivers on both nodes leave no whole CPU anywhere (deadlock).
RAY_CPUS=${LIVERSEG_RAY_CPUS:-2}
export RAY_USAGE_STATS_ENABLED=0
# Submitted jobs (`liverseg tune --submit`) start `python -m liverseg...` on the head: the nodes' PATH
# must lead to this Python, as the image's does on Kubernetes. The dashboard (Jobs API) is on DASH_PORT.
export PATH="$BIN:$PATH"
# Token auth with this stack's own token (not ~/.ray/auth_token, which every local cluster shares).
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/ray-token
[ -s "$RAY_AUTH_TOKEN_PATH" ] || "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$RAY_AUTH_TOKEN_PATH"
ray_up() {  # head + one more node on fresh ports; Ray picks more ports itself and may lose a race for one
  RAY_PORT=$(free_port); DASH_PORT=$(free_port)
  "$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" --num-cpus "$RAY_CPUS" \
    --temp-dir "$DIR/ray" --object-store-memory 200000000 --include-dashboard true \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --disable-usage-stats >"$DIR/logs/ray-head.log" 2>&1 \
    && "$BIN/ray" start --address "127.0.0.1:$RAY_PORT" --node-ip-address 127.0.0.1 --num-cpus "$RAY_CPUS" \
      --object-store-memory 200000000 --disable-usage-stats >"$DIR/logs/ray-node.log" 2>&1
}
if ! ray_up; then
  cp "$DIR/logs/ray-head.log" "$DIR/logs/ray-head.first-try.log"
  say "ray start failed (see $DIR/logs/ray-head.first-try.log); once more on other ports"
  leftover=$("$PY" "$REPO/deploy/local/stackpids.py" "$DIR/ray")
  [ -z "$leftover" ] || { kill -KILL $leftover 2>/dev/null || true; sleep 1; }
  ray_up || die "ray start failed twice (see $DIR/logs/ray-head.log, ray-node.log)"
fi
# Ray daemonises: its processes are the ones whose command line names our temp dir.
"$PY" "$REPO/deploy/local/stackpids.py" "$DIR/ray" >"$DIR/pids/ray"

# MLflow: PostgreSQL backend, artifacts proxied into the bucket, basic-auth with its users in PostgreSQL;
# webhooks may go to http://127.0.0.1 replicas, and a new one is seen within 5 s (MLflow caches the list).
PG_URI=postgresql+psycopg://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT
cat >"$DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $PG_URI/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
say "mlflow on 127.0.0.1:$MLFLOW_PORT"
start_bg mlflow env MLFLOW_BACKEND_STORE_URI="$PG_URI/mlflow" MLFLOW_AUTH_CONFIG_PATH="$DIR/basic_auth.ini" \
  MLFLOW_AUTH_ADMIN_USERNAME=admin MLFLOW_AUTH_ADMIN_PASSWORD="$ADMIN_PASSWORD" \
  MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" \
  AWS_ACCESS_KEY_ID="$S3_KEY_ID" AWS_SECRET_ACCESS_KEY="$S3_SECRET" AWS_DEFAULT_REGION=us-east-1 \
  MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY="$WEBHOOK_KEY" MLFLOW_FLASK_SERVER_SECRET_KEY="$FLASK_SECRET" \
  MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true \
  MLFLOW_WEBHOOK_CACHE_TTL="${LIVERSEG_WEBHOOK_CACHE_TTL:-5}" \
  PATH="$BIN:$PATH" "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
  --artifacts-destination "s3://$BUCKET/artifacts" --app-name basic-auth --workers "${LIVERSEG_MLFLOW_WORKERS:-2}"
wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 120
sleep 1  # another program that took the port meanwhile would answer too: MLflow must still be running
alive mlflow || die "MLflow exited (see $DIR/logs/mlflow.log; port $MLFLOW_PORT taken meanwhile?)"

cat >"$DIR/stack.env.tmp" <<EOF
MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
AWS_ACCESS_KEY_ID=$S3_KEY_ID
AWS_SECRET_ACCESS_KEY=$S3_SECRET
AWS_DEFAULT_REGION=us-east-1
RAY_ADDRESS=127.0.0.1:$RAY_PORT
RAY_DASHBOARD_URL=http://127.0.0.1:$DASH_PORT
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=$DIR/ray-token
LIVERSEG_BUCKET_URL=s3://$BUCKET
EOF
# the admin's alone: the admin password creates users and grants; the webhook secret lets whoever holds
# it make every replica reload (only the replicas and `liverseg webhook add` need it)
cat >"$DIR/admin.env.tmp" <<EOF
LIVERSEG_ADMIN_USER=admin
LIVERSEG_ADMIN_PASSWORD=$ADMIN_PASSWORD
LIVERSEG_WEBHOOK_SECRET=$WEBHOOK_SECRET
EOF
mv "$DIR/admin.env.tmp" "$DIR/admin.env"
mv "$DIR/stack.env.tmp" "$DIR/stack.env"
say "ready in ${SECONDS} s"
cat "$DIR/stack.env" "$DIR/admin.env"
