"""MLflow run context provider: every run started with mlflow-edge installed gets the hardware fingerprint.

Registered under the ``mlflow.run_context_provider`` entry point, so ``mlflow.start_run()`` in any program tags the
run with ``hw.*`` (CPU model and flags, cores, memory, accelerator, OS) and ``version.<framework>``.
"""

from __future__ import annotations

from mlflow.tracking.context.abstract_context import RunContextProvider

from mlflow_edge.targets import framework_versions, hardware_fingerprint


class HardwareContext(RunContextProvider):
    """The ``hw.*`` and ``version.*`` tags of the conventions."""

    def in_context(self) -> bool:
        return True

    def tags(self) -> dict[str, str]:
        return {**hardware_fingerprint(), **framework_versions()}
