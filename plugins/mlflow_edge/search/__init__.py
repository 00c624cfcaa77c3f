"""Optuna search over backends, precisions and options, with gates as constraints and a Pareto report."""

from mlflow_edge.search.config import MULTI_OBJECTIVE, SearchConfig, parse_objectives
from mlflow_edge.search.objective import Objective
from mlflow_edge.search.report import pareto_table, write_search_report
from mlflow_edge.search.space import backends_for, suggest
from mlflow_edge.search.study import run_search

__all__ = ["MULTI_OBJECTIVE", "Objective", "SearchConfig", "backends_for", "parse_objectives", "pareto_table",
           "run_search", "suggest", "write_search_report"]
