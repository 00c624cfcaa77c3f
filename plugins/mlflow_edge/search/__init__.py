"""Optuna search over backends, precisions and options, with gates as constraints and a Pareto report."""

from mlflow_edge.search.space import backends_for, suggest
from mlflow_edge.search.study import (
    MULTI_OBJECTIVE,
    Objective,
    pareto_table,
    parse_objectives,
    run_search,
    write_search_report,
)

__all__ = ["MULTI_OBJECTIVE", "Objective", "backends_for", "parse_objectives", "pareto_table", "run_search",
           "suggest", "write_search_report"]
