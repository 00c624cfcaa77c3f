"""Mixed-precision recipes: the quantization type of each tensor of a model, as a file users read, edit, re-apply.

A :class:`Recipe` is a default type plus ordered rules ``pattern → type``; a tensor takes the type of the first rule
whose pattern is found in its name (regular-expression *search*, as ``llama-quantize --tensor-type`` does), else the
default. Patterns use the subset of regular expressions that Python and ECMAScript (C++ ``std::regex``) read alike.

The file (``recipe.json``), hand-editable, one rule per line::

    {
     "mlflow_edge_recipe": 1,
     "backend": "...",
     "architecture": "llama",
     "default_type": "Q4_0",
     "tensor_types": [
      {"pattern": "^token_embd\\.weight$", "type": "Q8_0"},
      {"pattern": "ffn_down", "type": "Q6_K"}
     ],
     "source_sha256": "...",
     "budget": {"target_bpw": 4.8},
     "predicted": {"bits": 1.2e9, "bpw": 4.79, "error": 3.1}
    }

A budgeted recipe comes from a *sensitivity table* (a DataFrame with columns ``tensor, type, params, bits, error``:
one row per tensor and candidate type, ``bits`` the tensor's real size at that type, ``error`` its predicted error):
:func:`allocate` picks one type per tensor minimizing the summed error within a bit budget (:func:`budget_bits`), and
:func:`recipe_from_allocation` writes it as one exact rule per tensor. Nothing here knows a framework.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from mlflow_edge.errors import EdgeError, first_line

if TYPE_CHECKING:
    import pandas as pd

VERSION_KEY = "mlflow_edge_recipe"
VERSION = 1
TABLE_COLUMNS = ("tensor", "type", "params", "bits", "error")
_REQUIRED = ("backend", "architecture", "default_type", "tensor_types")
_OPTIONAL = ("source_sha256", "budget", "predicted", "sensitivity", "settings")
BUDGET_OPTIONS = ("target_bpw", "target_size_mb")
"""The options of a budgeted recipe, the same in every backend: bits per weight, or the model file's size in MB."""
SEARCH_BUDGETS_BPW = (4.5, 5.0, 5.5, 6.0, 6.5)
"""The bit budgets every backend's search samples for its budgeted recipes: one grid, so that a budget means the same
for each framework (bits per weight over every quantized weight, scales included)."""
# Python-only syntax that std::regex (ECMAScript) reads differently or refuses: named groups, lookbehind, inline flags
_NOT_PORTABLE = re.compile(r"\(\?(?![:=!])")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Tensors whose name contains a match of ``pattern`` get ``type``."""

    pattern: str
    type: str


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A per-tensor type assignment for one backend and architecture; the first matching rule wins."""

    backend: str
    architecture: str
    default_type: str
    """The type of every tensor no rule names (for a framework with type mixtures, the mixture's name)."""
    rules: tuple[Rule, ...] = ()
    source_sha256: str | None = None
    """The source model the recipe was made for (information: a recipe applies to any model it validates against)."""
    budget: Mapping[str, float] | None = None
    """What the allocation aimed at (``{"target_bpw": 4.8}``)."""
    predicted: Mapping[str, float] | None = None
    """What the allocation predicted (``bits``, ``bpw``, ``error``)."""
    sensitivity: Mapping[str, Any] | None = None
    """How the sensitivity table was measured (candidate types, importance matrix …)."""
    settings: Mapping[str, Any] | None = None
    """The backend options the recipe was applied with that decide the bytes besides the types (llama.cpp's
    ``imatrix``, NNCF's ``group_size``): re-applying the file alone uses them (:func:`with_settings`)."""

    def type_of(self, tensor: str) -> str:
        """The type ``tensor`` gets: the first matching rule's, else the default."""
        for rule in self.rules:
            if re.search(rule.pattern, tensor):
                return rule.type
        return self.default_type

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {VERSION_KEY: VERSION, "backend": self.backend, "architecture": self.architecture,
                                "default_type": self.default_type,
                                "tensor_types": [{"pattern": r.pattern, "type": r.type} for r in self.rules]}
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                data[key] = dict(value) if isinstance(value, Mapping) else value
        return data

    def to_json(self) -> str:
        """The canonical text: fixed key order, one rule per line, nested objects with sorted keys (stable bytes)."""
        data = self.to_dict()
        lines = []
        for key, value in data.items():
            if key == "tensor_types":
                rules = ["  " + json.dumps(rule, separators=(", ", ": ")) for rule in value]
                text = "[\n" + ",\n".join(rules) + "\n ]" if rules else "[]"
            else:
                text = json.dumps(value, sort_keys=True)
            lines.append(f" {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def digest(self) -> str:
        """sha256 of :meth:`to_json`: equal digests, equal recipes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` (through a temporary file: never half a recipe)."""
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(self.to_json(), encoding="utf-8")
        os.replace(partial, path)
        return path


def load_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe in the JSON file ``path``; a one-line :class:`EdgeError` for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"recipe {path} is not a file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EdgeError(f"recipe {path} is empty")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise EdgeError(f"recipe {path} is not JSON: {first_line(exc)}") from None
    return recipe_from_dict(data, where=f"recipe {path}")


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    """A :class:`Recipe` from its parsed JSON; ``where`` starts every error message."""
    if not isinstance(data, dict) or VERSION_KEY not in data:
        raise EdgeError(f"{where} is not an mlflow-edge recipe (no \"{VERSION_KEY}\" key)")
    if data[VERSION_KEY] != VERSION:
        raise EdgeError(f"{where} has version {data[VERSION_KEY]!r}; this mlflow-edge reads version {VERSION}")
    if unknown := sorted(set(data) - {VERSION_KEY, *_REQUIRED, *_OPTIONAL}):
        raise EdgeError(f"{where} has unknown key(s) {', '.join(unknown)} (known: {', '.join(_REQUIRED + _OPTIONAL)})")
    for key in _REQUIRED:
        if key not in data:
            raise EdgeError(f"{where} has no \"{key}\"")
    for key in ("backend", "architecture", "default_type"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise EdgeError(f"{where}: \"{key}\" must be a non-empty string")
    for key in _OPTIONAL[1:]:
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise EdgeError(f"{where}: \"{key}\" must be an object")
    rules = _rules(data["tensor_types"], where)
    return Recipe(backend=data["backend"], architecture=data["architecture"], default_type=data["default_type"].upper(),
                  rules=rules, source_sha256=data.get("source_sha256"), budget=data.get("budget"),
                  predicted=data.get("predicted"), sensitivity=data.get("sensitivity"), settings=data.get("settings"))


def _rules(items: Any, where: str) -> tuple[Rule, ...]:
    if not isinstance(items, list):
        raise EdgeError(f"{where}: \"tensor_types\" must be a list of {{\"pattern\", \"type\"}} objects")
    rules = []  # none: every tensor at the default type
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and set(item) == {"pattern", "type"}
                and all(isinstance(item[k], str) and item[k] for k in item)):
            raise EdgeError(f"{where}: tensor_types[{i}] must be {{\"pattern\": \"…\", \"type\": \"…\"}}, got {item!r}")
        check_pattern(item["pattern"], f"{where}: tensor_types[{i}]")
        rules.append(Rule(item["pattern"], item["type"].upper()))
    return tuple(rules)


def check_pattern(pattern: str, where: str = "pattern") -> None:
    """A one-line error unless ``pattern`` is a regular expression that Python and ECMAScript read alike."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise EdgeError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") from None
    if _NOT_PORTABLE.search(pattern):
        raise EdgeError(f"{where}: {pattern!r} uses Python-only syntax '(?…' (named groups, lookbehind and inline "
                        "flags do not work in C++ std::regex; use (?:…), (?=…) or (?!…))")


def validate_against(recipe: Recipe, tensor_names: Sequence[str], architecture: str, supported_types: Collection[str],
                     backend: str, default_types: Collection[str] | None = None) -> None:
    """Refuse (one line) a recipe that does not fit a model: made for another backend or architecture, a rule whose
    pattern matches none of ``tensor_names``, or a type the backend does not support (``default_types``: the types
    allowed as the default, when they differ from those of the rules)."""
    if recipe.backend != backend:
        raise EdgeError(f"a recipe for another backend ({recipe.backend}), not {backend}")
    if recipe.architecture != architecture:
        raise EdgeError(f"a recipe for another architecture ({recipe.architecture}); this model is {architecture}")
    defaults = supported_types if default_types is None else default_types
    if recipe.default_type not in defaults:
        raise EdgeError(f"the recipe's default_type {recipe.default_type} is not supported by {backend} "
                        f"(choose from {', '.join(defaults)})")
    for rule in recipe.rules:
        if rule.type not in supported_types:
            raise EdgeError(f"the recipe's type {rule.type} (pattern {rule.pattern!r}) is not supported by {backend} "
                            f"(choose from {', '.join(supported_types)})")
        if not any(re.search(rule.pattern, name) for name in tensor_names):
            raise EdgeError(f"the recipe's pattern {rule.pattern!r} matches no quantizable tensor of the model "
                            f"({len(tensor_names)} tensors, e.g. {tensor_names[0] if tensor_names else 'none'})")


# -- budgeted allocation -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Choices:
    """The table as matrices: one row per tensor, its candidate types sorted by bits (missing ones: inf)."""

    tensors: list[str]
    types: np.ndarray  # object [n, k]
    bits: np.ndarray  # float [n, k]
    error: np.ndarray  # float [n, k]
    params: int

    def pick(self, index: np.ndarray) -> tuple[float, float]:
        rows = np.arange(len(self.tensors))
        return float(self.bits[rows, index].sum()), float(self.error[rows, index].sum())


def _choices(table: pd.DataFrame) -> _Choices:
    check_table(table)
    tensors = list(dict.fromkeys(table["tensor"]))
    groups = {name: group.sort_values(["bits", "error"], kind="stable") for name, group in table.groupby("tensor")}
    width = max(len(g) for g in groups.values())
    types = np.full((len(tensors), width), None, dtype=object)
    bits = np.full((len(tensors), width), np.inf)
    error = np.full((len(tensors), width), np.inf)
    for i, name in enumerate(tensors):
        group = groups[name]
        types[i, : len(group)] = group["type"].to_numpy()
        bits[i, : len(group)] = group["bits"].to_numpy(dtype=float)
        error[i, : len(group)] = group["error"].to_numpy(dtype=float)
    params = int(table.drop_duplicates("tensor")["params"].sum())
    return _Choices(tensors, types, bits, error, params)


def check_table(table: pd.DataFrame) -> None:
    """A one-line error unless ``table`` is a sensitivity table (columns, one row per tensor and type, sane values)."""
    if missing := [c for c in TABLE_COLUMNS if c not in table.columns]:
        raise EdgeError(f"a sensitivity table needs the columns {', '.join(TABLE_COLUMNS)} "
                        f"(missing {', '.join(missing)})")
    if table.empty:
        raise EdgeError("the sensitivity table is empty")
    if table.duplicated(["tensor", "type"]).any():
        raise EdgeError("the sensitivity table has a tensor with the same type twice")
    values = table[["params", "bits", "error"]].to_numpy(dtype=float)
    if not np.isfinite(values).all() or (values[:, :2] <= 0).any() or (values[:, 2] < 0).any():
        raise EdgeError("the sensitivity table needs positive params and bits and non-negative finite errors")


def allocate(table: pd.DataFrame, budget_bits: float) -> dict[str, str]:
    """One type per tensor (in the table's tensor order) minimizing the summed ``error`` with summed ``bits`` at most
    ``budget_bits``: the Lagrangian relaxation (minimize error + λ·bits per tensor, λ by bisection: the smallest λ
    whose choice fits), then a greedy fill of the bits left over (best error saved per extra bit first).

    The result is within one tensor's error range of the optimum (a multiple-choice knapsack's LP relaxation has at
    most one fractional item). A budget below the smallest size the types reach, or above the largest, is an error.
    """
    choices = _choices(table)
    low = float(np.nanmin(choices.bits, axis=1).sum())
    high = float(np.where(np.isinf(choices.bits), -np.inf, choices.bits).max(axis=1).sum())
    _check_budget(budget_bits, low, high, choices.params)
    index = _greedy_fill(choices, _lagrangian(choices, budget_bits), budget_bits)
    index = _swap_improve(choices, index, budget_bits)
    rows = np.arange(len(choices.tensors))
    return dict(zip(choices.tensors, choices.types[rows, index].tolist()))


def _check_budget(budget: float, low: float, high: float, params: int) -> None:
    def words(bits: float) -> str:
        return f"{bits / params:.3f} bpw, {bits / 8e6:.2f} MB of tensors"

    if not math.isfinite(budget) or budget < low:
        raise EdgeError(f"the budget ({words(budget)}) is below the smallest size these types reach ({words(low)}); "
                        "raise the target or add a smaller type")
    if budget > high:
        raise EdgeError(f"the budget ({words(budget)}) is above the largest size these types reach ({words(high)}): "
                        "nothing to trade; lower the target or add a larger type")


def _argmin(choices: _Choices, lam: float) -> np.ndarray:
    """Per tensor the type minimizing error + λ·bits (ties: fewer bits, since each row is sorted by bits)."""
    missing = np.isinf(choices.bits)
    cost = choices.error + lam * np.where(missing, 0.0, choices.bits)
    return np.argmin(np.where(missing, np.inf, cost), axis=1)


def _lagrangian(choices: _Choices, budget: float) -> np.ndarray:
    best = _argmin(choices, 0.0)
    if choices.pick(best)[0] <= budget:
        return best
    lo, hi = 0.0, 1.0
    while choices.pick(_argmin(choices, hi))[0] > budget:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise EdgeError("the allocation found no type choice within the budget")
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        if choices.pick(_argmin(choices, mid))[0] <= budget:
            hi = mid
        else:
            lo = mid
    return _argmin(choices, hi)


def _moves(choices: _Choices, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every (tensor, type): the extra bits and the error saved by switching that tensor to that type."""
    rows = np.arange(len(choices.tensors))
    extra = choices.bits - choices.bits[rows, index][:, None]
    saved = choices.error[rows, index][:, None] - choices.error
    return extra, np.where(np.isinf(choices.bits), -np.inf, saved)


def _greedy_fill(choices: _Choices, index: np.ndarray, budget: float) -> np.ndarray:
    """Upgrade tensors while bits are left: each time the upgrade saving the most error per extra bit that fits."""
    index = index.copy()
    while True:
        extra, saved = _moves(choices, index)
        ok = (extra > 0) & (extra <= budget - choices.pick(index)[0]) & (saved > 0)
        if not ok.any():
            return index
        ratio = np.where(ok, saved / np.where(ok, extra, 1.0), -np.inf)
        row, col = np.unravel_index(np.argmax(ratio), ratio.shape)
        index[row] = col


def _swap_improve(choices: _Choices, index: np.ndarray, budget: float) -> np.ndarray:
    """Pairs of moves (one tensor up, another down) that lower the error and still fit, best first, then a fill."""
    index = index.copy()
    for _ in range(10 * len(choices.tensors)):
        extra, saved = _moves(choices, index)
        left = budget - choices.pick(index)[0]
        up = np.argwhere((extra > left) & (saved > 0))
        down = np.argwhere((extra < 0) & np.isfinite(saved))
        if not len(up) or not len(down):
            break
        gain = saved[up[:, 0], up[:, 1]][:, None] + saved[down[:, 0], down[:, 1]][None, :]
        fits = extra[up[:, 0], up[:, 1]][:, None] + extra[down[:, 0], down[:, 1]][None, :] <= left
        ok = fits & (up[:, 0][:, None] != down[:, 0][None, :]) & (gain > 1e-12 * max(choices.pick(index)[1], 1e-300))
        if not ok.any():
            break
        i, j = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), gain.shape)
        index[up[i, 0]], index[down[j, 0]] = up[i, 1], down[j, 1]
        index = _greedy_fill(choices, index, budget)
    return index


def budget_bits(table: pd.DataFrame, target_bpw: float | None = None, target_size_mb: float | None = None,
                fixed_bits: float = 0) -> float:
    """The bit budget of the table's tensors: ``target_bpw`` bits per weight over the table's parameters, or a file of
    ``target_size_mb`` (MB = 1e6 bytes) less ``fixed_bits`` (what the file holds besides the table's tensors)."""
    check_table(table)
    params = int(table.drop_duplicates("tensor")["params"].sum())
    return budget_bpw(params, target_bpw, target_size_mb, fixed_bits) * params


def budget_bpw(params: int, target_bpw: float | None = None, target_size_mb: float | None = None,
               fixed_bits: float = 0) -> float:
    """The bits per weight a budget leaves ``params`` quantized weights: ``target_bpw`` itself, or a file of
    ``target_size_mb`` (MB = 1e6 bytes) less ``fixed_bits`` (what the file holds besides those weights) spread
    over them; exactly one of the two, a positive number."""
    if (target_bpw is None) == (target_size_mb is None):
        raise EdgeError("give exactly one of target_bpw and target_size_mb")
    if target_bpw is not None:
        if not (math.isfinite(target_bpw) and target_bpw > 0):
            raise EdgeError(f"target_bpw must be a positive number, got {target_bpw}")
        return float(target_bpw)
    if not (math.isfinite(target_size_mb) and target_size_mb > 0):
        raise EdgeError(f"target_size_mb must be a positive number, got {target_size_mb}")
    bits = float(target_size_mb) * 8e6 - float(fixed_bits)
    if bits <= 0:
        raise EdgeError(f"target_size_mb {target_size_mb} is below the size of what is not quantized "
                        f"({fixed_bits / 8e6:.2f} MB)")
    return bits / params


def given_budget(options: Mapping[str, Any]) -> dict[str, float]:
    """The budget among a backend's ``options`` (``target_bpw`` or ``target_size_mb``, :data:`BUDGET_OPTIONS`):
    empty when none is given, a one-line error when both are."""
    given = {key: float(options[key]) for key in BUDGET_OPTIONS if options.get(key) is not None}
    if len(given) > 1:
        raise EdgeError("give one of target_bpw and target_size_mb, not both")
    return given


def predict(table: pd.DataFrame, allocation: Mapping[str, str]) -> dict[str, float]:
    """Summed ``bits`` and ``error`` of ``allocation`` by the table, and its bits per weight."""
    picked = table.set_index(["tensor", "type"]).loc[list(allocation.items())]
    bits, params = float(picked["bits"].sum()), float(picked["params"].sum())
    return {"bits": bits, "bpw": bits / params, "error": float(picked["error"].sum())}


def exact_pattern(tensor: str) -> str:
    """The anchored pattern that matches ``tensor`` and nothing else."""
    return "^" + re.escape(tensor) + "$"


def recipe_from_allocation(allocation: Mapping[str, str], *, backend: str, architecture: str, default_type: str,
                           source_sha256: str | None = None, budget: Mapping[str, float] | None = None,
                           predicted: Mapping[str, float] | None = None,
                           sensitivity: Mapping[str, Any] | None = None,
                           settings: Mapping[str, Any] | None = None) -> Recipe:
    """A recipe with one exact, anchored rule per allocated tensor (in the allocation's order)."""
    rules = tuple(Rule(exact_pattern(tensor), kind) for tensor, kind in allocation.items())
    return Recipe(backend=backend, architecture=architecture, default_type=default_type, rules=rules,
                  source_sha256=source_sha256, budget=budget, predicted=predicted, sensitivity=sensitivity,
                  settings=settings or None)


def with_settings(options: Mapping[str, Any], recipe: Recipe) -> dict[str, Any]:
    """``options`` completed by the recipe's :attr:`~Recipe.settings` (the options given win): a recipe file applied
    alone writes the same bytes as the quantization that wrote it."""
    return {**dict(recipe.settings or {}), **options}


# -- the picture ---------------------------------------------------------------------------------------------------
def plot_sensitivity(table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """A PNG of the error of every tensor at every type (log scale), so the sensitive tensors stand out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_table(table)
    tensors = list(dict.fromkeys(table["tensor"]))
    position = {name: i for i, name in enumerate(tensors)}
    positive = table["error"][table["error"] > 0]
    floor = float(positive.min()) / 10 if len(positive) else 1e-12  # lossless entries drawn at the bottom
    figure = Figure(figsize=(min(6 + 0.09 * len(tensors), 40), 6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    order = table.groupby("type")["bits"].sum() / table.groupby("type")["params"].sum()
    for kind in order.sort_values().index:
        rows = table[table["type"] == kind]
        axes.plot([position[t] for t in rows["tensor"]], rows["error"].clip(lower=floor), marker="o",
                  markersize=3, linestyle="none", label=f"{kind} ({order[kind]:.2f} bpw)")
    axes.set_yscale("log")
    axes.set_xticks(range(len(tensors)), _short(tensors), rotation=90, fontsize=5)
    axes.set_xlim(-1, len(tensors))
    axes.set_ylabel("predicted error (log)")
    axes.set_title(title or "per-tensor sensitivity: predicted error at each type")
    axes.legend(fontsize=7, ncols=2)
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=110)
    return Path(path)


def _short(names: Iterable[str]) -> list[str]:
    return [name.removesuffix(".weight") for name in names]


SIDE_FILES = ("recipe.json", "sensitivity.csv", "sensitivity.png")
"""Files a quantization may write beside a model file, or into a model folder, to say how it was made."""


def side_files(model_path: str | os.PathLike) -> list[Path]:
    """The :data:`SIDE_FILES` beside the model file ``model_path``, or inside the model folder ``model_path``."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    return [folder / name for name in SIDE_FILES if (folder / name).is_file()]
