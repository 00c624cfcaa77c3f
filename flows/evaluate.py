"""MLproject entry point `evaluate`: `mlflow-edge evaluate` (see `mlflow-edge evaluate --help`)."""

import sys

from mlflow_edge.cli import main

main(["evaluate", *sys.argv[1:]])
