"""MLproject entry point `promote`: `mlflow-edge promote` (see `mlflow-edge promote --help`)."""

import sys

from mlflow_edge.cli import main

main(["promote", *sys.argv[1:]])
