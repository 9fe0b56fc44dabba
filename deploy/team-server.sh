#!/usr/bin/env bash
# The lab's shared MLflow tracking server: a PostgreSQL backend store, artifacts proxied by the
# server (so clients need no storage credentials), logins through MLflow's basic-auth app, and
# bound to 127.0.0.1 unless you choose otherwise. See README "A team tracking server".
#
#   MLFLOW_BACKEND_URI       postgresql+psycopg://mlflow@db-host:5432/mlflow   (required)
#   MLFLOW_AUTH_DB_URI       postgresql+psycopg://mlflow@db-host:5432/mlflow_auth (required)
#   MLFLOW_ARTIFACTS         /srv/mlflow-artifacts, or s3://bucket/prefix       (required)
#   MLFLOW_AUTH_ADMIN_PASSWORD   the admin's password, read on the very first start only
#   PGPASSWORD / ~/.pgpass   the database password: never inside the URIs above, which show
#                            in `ps` and in logs
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL (MinIO)  for s3:// only
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the auth app; the same on every replica
#                            (one server: a random key is made at each start)
#   DEFAULT_PERMISSION (EDIT)  what a user may do in experiments and models others made:
#                            EDIT lets every lab member log runs into the shared experiments
#                            (Default included: `mlflow run` without --experiment-name) and
#                            register versions; deleting and permissions stay with the
#                            creator and the admin (MANAGE). READ makes them read-only.
#   HOST (127.0.0.1), PORT (5000), WORKERS (4)
set -euo pipefail

: "${MLFLOW_BACKEND_URI:?set MLFLOW_BACKEND_URI, e.g. postgresql+psycopg://mlflow@db-host/mlflow}"
: "${MLFLOW_AUTH_DB_URI:?set MLFLOW_AUTH_DB_URI, e.g. postgresql+psycopg://mlflow@db-host/mlflow_auth}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to a shared folder or an s3:// bucket}"
for uri in "$MLFLOW_BACKEND_URI" "$MLFLOW_AUTH_DB_URI"; do
  if [[ "$uri" =~ ://[^/@]*:[^/@]*@ ]]; then
    echo "error: put the database password in PGPASSWORD or ~/.pgpass, not in the URI" >&2
    exit 2
  fi
done

# The auth app reads its settings from a file: write one that only this user can read.
config="$(mktemp -t mlflow-auth.XXXXXX.ini)"
chmod 600 "$config"
cat > "$config" <<INI
[mlflow]
default_permission = ${DEFAULT_PERMISSION:-EDIT}
database_uri = ${MLFLOW_AUTH_DB_URI}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Checking a password costs a PBKDF2 hash, on every request: remember good ones for a minute
# (a changed password takes up to that long to reach the other workers).
auth_cache_ttl_seconds = 60
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:=$(python -c 'import secrets; print(secrets.token_hex(32))')}"
export MLFLOW_FLASK_SERVER_SECRET_KEY

exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --app-name basic-auth \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers "${WORKERS:-4}"
