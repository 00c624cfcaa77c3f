#!/usr/bin/env bash
# PostgreSQL from Debian packages, for the scale-out tests and a shared Optuna/MLflow store (README "Scale out").
# Does nothing when PostgreSQL's server binaries are already there; needs root or sudo to install them.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
  exit 0
fi
as_root=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "mlflow-edge: error: PostgreSQL is not installed and neither root nor sudo is available to install it (apt-get install postgresql)" >&2; exit 1; }
  as_root=(sudo)
fi
printf '[setup %s] installing PostgreSQL (Debian packages)\n' "$(date +%H:%M:%S)" >&2
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends postgresql >/dev/null
