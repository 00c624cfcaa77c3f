"""MLproject entry point `convert`: `mlflow-edge convert` (see `mlflow-edge convert --help`)."""

import sys

from mlflow_edge.cli import main

main(["convert", *sys.argv[1:]])
