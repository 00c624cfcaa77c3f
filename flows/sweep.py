"""MLproject entry point `sweep`: `mlflow-edge sweep` (see `mlflow-edge sweep --help`)."""

import sys

from mlflow_edge.cli import main

main(["sweep", *sys.argv[1:]])
