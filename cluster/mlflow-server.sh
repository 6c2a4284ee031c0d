#!/usr/bin/env bash
# MLflow tracking server with basic auth for a fisher_scale cluster: on the head node of `ray up cluster/<cloud>.yaml`
# (started by head_start_ray_commands) or as the KubeRay Deployment in cluster/kuberay/mlflow.yaml.
#
# Environment (cluster/secrets.env.example documents each):
#   MLFLOW_BACKEND_STORE_URI       runs, params, metrics: a database, e.g. postgresql://fisher@DB_HOST:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI       users and permissions, e.g. postgresql://fisher@DB_HOST:5432/mlflow_auth
#   MLFLOW_ARTIFACTS_DESTINATION   artifacts, served through this server: s3://BUCKET/mlflow or gs://BUCKET/mlflow
#   MLFLOW_AUTH_ADMIN_PASSWORD     password of the `admin` user, created on the first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY CSRF key of the auth app
#   PGPASSWORD                     the database password (libpq reads it; keeps it out of the URIs)
#   MLFLOW_PORT (5000), MLFLOW_HOST (0.0.0.0: reachable inside the cluster network only; firewall / ClusterIP)
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (a database URI)}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (a database URI for users and permissions)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://... or gs://...)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
port="${MLFLOW_PORT:-5000}"

# `ray up` reruns the start commands on an existing head: keep a server that is already listening.
if python -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', ${port})))"; then
    echo "an MLflow server already listens on port ${port}"
    exit 0
fi

config="${MLFLOW_AUTH_CONFIG_PATH:-${HOME}/.mlflow/basic_auth.ini}"
mkdir -p "$(dirname "${config}")"
umask 077
cat > "${config}" <<EOF
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="${config}"

exec mlflow server --app-name basic-auth \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${port}" \
    --backend-store-uri "${MLFLOW_BACKEND_STORE_URI}" \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}"
