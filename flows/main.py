"""MLproject entry point `main`: `mlflow-edge main` (see `mlflow-edge main --help`)."""

import sys

from mlflow_edge.cli import main

main(["main", *sys.argv[1:]])
