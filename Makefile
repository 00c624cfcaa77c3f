# mlflow-edge: `make demo` runs the whole flow on the offline demo model, `make test` runs the test suite.
# Both set up ./.venv first (scripts/setup.sh; the first time builds llama-cpp-python, a few minutes).
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
PYTEST_ARGS ?=

.PHONY: setup demo test lint ui clean

setup:
	scripts/setup.sh

demo: setup
	mlflow run . -e main --env-manager local --experiment-name mlflow-edge

test: setup lint
	python -m pytest $(PYTEST_ARGS)

lint: setup
	python -m ruff check plugins tests benchmarks flows

ui: setup
	mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1

clean:
	rm -rf mlruns mlflow.db outputs
