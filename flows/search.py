"""MLproject entry point `search`: `mlflow-edge search` (see `mlflow-edge search --help`)."""

import sys

from mlflow_edge.cli import main

main(["search", *sys.argv[1:]])
