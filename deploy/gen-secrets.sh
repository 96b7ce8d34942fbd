#!/usr/bin/env bash
# Generate every password, key and token the team stack needs, fresh and random, into a file that
# stays out of git (mode 600; refuses to overwrite: PostgreSQL keeps the password it was initialised
# with, so a second set would lock the services out of their own data).
#   deploy/gen-secrets.sh compose deploy/mlflow/.env      # docker compose reads .env beside the file
#   deploy/gen-secrets.sh k8s ~/liverseg-secrets.yaml     # then: kubectl apply -f ~/liverseg-secrets.yaml
# Nothing here is a default password: every value is drawn from /dev/urandom at the call.
set -euo pipefail

usage() { echo "usage: $0 compose|k8s OUTFILE" >&2; exit 2; }
[ $# -eq 2 ] || usage
mode=$1 out=$2
case $mode in compose|k8s) ;; *) usage ;; esac
if [ -e "$out" ]; then
  echo "$out: exists; not overwritten (delete it only together with the data it protects)" >&2
  exit 1
fi

rand() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }  # 64 hex chars: safe in URLs and YAML
fernet() { head -c 32 /dev/urandom | base64 | tr '+/' '-_'; }      # MLflow encrypts webhook secrets with it

PG=$(rand) S3_USER=liverseg S3_KEY=$(rand) ADMIN=admin ADMIN_PW=$(rand) FLASK=$(rand) FERNET=$(fernet)
RAY_PW=$(rand) SERVE_PW=$(rand) RELOAD=$(rand) HOOK=$(rand) RAY_TOKEN=$(rand)

compose() {
  cat <<ENV
POSTGRES_PASSWORD=$PG
MINIO_ROOT_USER=$S3_USER
MINIO_ROOT_PASSWORD=$S3_KEY
MLFLOW_AUTH_ADMIN_USERNAME=$ADMIN
MLFLOW_AUTH_ADMIN_PASSWORD=$ADMIN_PW
MLFLOW_FLASK_SERVER_SECRET_KEY=$FLASK
MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=$FERNET
ENV
}

secret() {  # NAME, then KEY=VALUE pairs
  printf -- '---\napiVersion: v1\nkind: Secret\nmetadata: {name: %s, namespace: liverseg}\ntype: Opaque\nstringData:\n' "$1"
  shift
  for kv in "$@"; do printf '  %s: "%s"\n' "${kv%%=*}" "${kv#*=}"; done
}

k8s() {
  echo "# liverseg secrets, generated $(date -u +%FT%TZ) by deploy/gen-secrets.sh: keep out of git"
  secret postgres "POSTGRES_PASSWORD=$PG"
  secret minio "MINIO_ROOT_USER=$S3_USER" "MINIO_ROOT_PASSWORD=$S3_KEY"
  secret mlflow "MLFLOW_AUTH_ADMIN_USERNAME=$ADMIN" "MLFLOW_AUTH_ADMIN_PASSWORD=$ADMIN_PW" \
    "MLFLOW_FLASK_SERVER_SECRET_KEY=$FLASK" "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=$FERNET"
  # the auth app's settings: users and permissions in PostgreSQL (database mlflow_auth, created by
  # postgres-init), never on the read-only mount of this Secret
  printf -- '---\napiVersion: v1\nkind: Secret\nmetadata: {name: mlflow-auth, namespace: liverseg}\ntype: Opaque\n'
  printf 'stringData:\n  basic_auth.ini: |\n    [mlflow]\n    default_permission = READ\n'
  printf '    database_uri = postgresql+psycopg://mlflow:%s@postgres:5432/mlflow_auth\n' "$PG"
  printf '    authorization_function = liverseg.registry.guard:authenticate\n'  # basic auth + liverseg's guard (docs/team.md)
  # Ray jobs and serving log in as MLflow users of their own (created with `liverseg users add`)
  secret liverseg-client "MLFLOW_TRACKING_USERNAME=ray-svc" "MLFLOW_TRACKING_PASSWORD=$RAY_PW" \
    "AWS_ACCESS_KEY_ID=$S3_USER" "AWS_SECRET_ACCESS_KEY=$S3_KEY"
  # Ray token auth (RAY_AUTH_MODE=token): every Ray node, the autoscaler, the job submitter and every
  # client (ray://, ray job submit) presents it; the key name is KubeRay's (authOptions.secretName)
  secret ray-auth "auth_token=$RAY_TOKEN"
  # serving only reads @champion: its account gets `--role reader`
  secret liverseg-serve "MLFLOW_TRACKING_USERNAME=serve-svc" "MLFLOW_TRACKING_PASSWORD=$SERVE_PW" \
    "LIVERSEG_RELOAD_TOKEN=$RELOAD" "LIVERSEG_WEBHOOK_SECRET=$HOOK"
}

tmp=$(mktemp "$(dirname "$out")/.secrets.XXXXXX")  # mode 600; renamed into place only when complete
trap 'rm -f "$tmp"' EXIT
"$mode" >"$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out ($mode); keep it out of git" >&2
