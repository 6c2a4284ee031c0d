#!/usr/bin/env bash
# MLflow tracking server with basic auth for a fisher_scale cluster: on the head node of `ray up cluster/<cloud>.yaml`
# (started by head_start_ray_commands) or as the KubeRay Deployment in cluster/kuberay/mlflow.yaml. It creates the
# user the trials log in as, without admin rights.
#
# Environment (cluster/mlflow-server.env.example documents each):
#   MLFLOW_BACKEND_STORE_URI       runs, params, metrics: a database, e.g. postgresql://mlflow@DB_HOST:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI       users and permissions, e.g. postgresql://mlflow@DB_HOST:5432/mlflow_auth
#   MLFLOW_ARTIFACTS_DESTINATION   artifacts, served through this server: s3://BUCKET/mlflow or gs://BUCKET/mlflow
#   MLFLOW_AUTH_ADMIN_PASSWORD     password of the `admin` user, created on the first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY CSRF key of the auth app
#   MLFLOW_TRIALS_USERNAME/PASSWORD the trials' user, created (not an admin) if it does not exist
#   PGPASSWORD                     the database password (libpq reads it; keeps it out of the URIs)
#   MLFLOW_PORT (5000), MLFLOW_HOST (127.0.0.1: the head's job drivers and SSH tunnels only; the KubeRay Deployment
#   sets 0.0.0.0 inside the pod network, where a NetworkPolicy admits the Ray head pods only)
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (a database URI)}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (a database URI for users and permissions)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://... or gs://...)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
: "${MLFLOW_TRIALS_USERNAME:?set MLFLOW_TRIALS_USERNAME (the user the trials log in as)}"
: "${MLFLOW_TRIALS_PASSWORD:?set MLFLOW_TRIALS_PASSWORD}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"

# `ray up` reruns the start commands on an existing head: keep a server that is already listening.
if python -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', ${port})))"; then
    echo "an MLflow server already listens on port ${port}"
    exit 0
fi

config="${MLFLOW_AUTH_CONFIG_PATH:-${HOME}/.mlflow/basic_auth.ini}"
mkdir -p "$(dirname "${config}")"
umask 077
cat > "${config}" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="${config}"  # the admin's password: MLFLOW_AUTH_ADMIN_PASSWORD, read by MLflow

mlflow server --app-name basic-auth \
    --host "${host}" --port "${port}" \
    --backend-store-uri "${MLFLOW_BACKEND_STORE_URI}" \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}" &
server=$!
trap 'kill "${server}" 2> /dev/null' EXIT TERM INT

# The trials' user, once the server answers: logged in as admin through MLflow's auth client.
MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="${MLFLOW_AUTH_ADMIN_PASSWORD}" python - "${port}" <<'PY'
import os, sys, time
from mlflow.exceptions import RestException
from mlflow.server import get_app_client

auth = get_app_client("basic-auth", tracking_uri=f"http://127.0.0.1:{sys.argv[1]}")
deadline = time.monotonic() + 300
while True:
    try:
        auth.get_user("admin")
        break
    except Exception:
        if time.monotonic() > deadline:
            sys.exit("the MLflow server did not answer within 300 s")
        time.sleep(2)
name = os.environ["MLFLOW_TRIALS_USERNAME"]
try:
    auth.get_user(name)
except RestException:
    auth.create_user(name, os.environ["MLFLOW_TRIALS_PASSWORD"])
    print(f"created the MLflow user {name} (not an admin)")
PY
wait "${server}"
