"""MLproject entry point `quantize`: `mlflow-edge quantize` (see `mlflow-edge quantize --help`)."""

import sys

from mlflow_edge.cli import main

main(["quantize", *sys.argv[1:]])
