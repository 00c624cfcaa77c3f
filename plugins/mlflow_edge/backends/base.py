"""The small interface every framework backend implements.

A backend turns a Hugging Face causal LM (a :class:`~mlflow_edge.sources.SourceModel`) into an :class:`Artifact` in its
own format (``convert``), re-encodes that artifact at a lower precision with the framework's own quantizer
(``quantize``), and loads an artifact into a :class:`Runner` that the evaluation harness measures. The harness, the
flows and the search only ever see these types, never a framework.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from mlflow_edge.errors import EdgeError

if TYPE_CHECKING:
    from mlflow_edge.evaluation.data import TextSlice
    from mlflow_edge.sources import SourceModel


_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


def option_bool(value: Any) -> bool:
    """A boolean backend option, from the CLI or MLproject (``"true"``, ``"1"``, ``"on"``, ``"false"`` …) or from
    code; anything else (``"ture"``) is an :class:`EdgeError`, never silently false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise EdgeError(f"not a boolean: {value!r} (use true or false)")


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A model in one backend's format, on disk.

    ``path`` is the file or folder a runtime loads; ``files`` are the model files whose bytes count as its size.
    """

    path: Path
    backend: str
    format: str
    precision: str
    source_name: str
    source_sha256: str
    num_parameters: int
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    files: tuple[Path, ...] = ()

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.files or (self.path,)))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data["files"] = [str(f) for f in self.files]
        data["options"] = dict(self.options)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Artifact":
        data = json.loads(text)
        data["path"] = Path(data["path"])
        data["files"] = tuple(Path(f) for f in data["files"])
        return cls(**data)


@dataclasses.dataclass
class Generation:
    """Timings of one greedy generation."""

    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    total_s: float


@runtime_checkable
class Runner(Protocol):
    """A loaded artifact, as the evaluation harness drives it.

    Token ids are those of the source model's tokenizer, so every backend scores the same input.
    """

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits for every position of ``tokens`` (one fresh sequence): float32 ``[len(tokens), vocab]``."""
        ...

    def prefill(self, tokens: Sequence[int]) -> float:
        """Process ``tokens`` as a fresh prompt without generating; return the seconds it took."""
        ...

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> Generation:
        """Greedily generate exactly ``max_new_tokens`` after ``tokens`` (end-of-sequence ignored), timed; a prompt
        and new tokens that do not fit the context (``len(tokens) + max_new_tokens - 1 > context_tokens``) are an
        :class:`EdgeError`, as is any sequence longer than the context in the other methods."""
        ...

    def close(self) -> None:
        """Free the runtime; harmless twice, and every later call raises :class:`EdgeError` (never crashes)."""
        ...



class SequenceRunner:
    """A :class:`Runner` built on a runtime's two steps on one sequence: ``reset()`` starts a fresh one and
    ``forward(tokens)`` appends ``tokens``, returning their logits ``[len(tokens), vocab]``. A subclass sets
    ``_n_ctx`` and may give cheaper steps for a prompt that needs no logits (``append``) and for one greedy step
    (``next_token``)."""

    _n_ctx: int

    @property
    def context_tokens(self) -> int:
        return self._n_ctx

    def reset(self) -> None:
        raise NotImplementedError

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def append(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` without reading their logits."""
        self.forward(tokens)

    def next_token(self, tokens: Sequence[int]) -> int:
        """Append ``tokens``; the argmax of the last position's logits."""
        return int(np.argmax(self.forward(tokens)[-1]))

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self.reset()
        return np.array(self.forward(tokens), dtype=np.float32)  # a copy: a runtime may reuse its buffer

    def prefill(self, tokens: Sequence[int]) -> float:
        self.reset()
        start = time.perf_counter()
        self.append(tokens)
        return time.perf_counter() - start

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> Generation:
        length = len(tokens) + max_new_tokens - 1
        if length > self._n_ctx:
            raise EdgeError(f"sequence of {length} tokens exceeds the context of {self._n_ctx}")
        self.reset()
        start = time.perf_counter()
        token = self.next_token(tokens)
        ttft = time.perf_counter() - start
        for _ in range(max_new_tokens - 1):
            token = self.next_token([token])
        return Generation(len(tokens), max_new_tokens, ttft, time.perf_counter() - start)

@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One quantization option a backend accepts, under the framework's own name."""

    name: str
    type: type
    default: Any = None
    choices: tuple[Any, ...] | None = None
    help: str = ""
    label: str | None = None
    """How the option shows in a trial's label on the search's plots: a template of ``{value}`` (``"g{value}"``), or
    ``""`` to leave it out; ``None`` shows ``name=value``, or the name alone for a true boolean."""
    label_off: str | None = None
    """For a boolean, the word shown when it is false (``"asym"`` for a false ``is_symmetric``); ``None`` shows none."""

    def label_word(self, value: Any) -> str | None:
        """``value`` of this option as a word of a plot label, ``None`` when it is unset, off or left out."""
        if isinstance(value, bool):
            shown = self.name if self.label is None else self.label
            return (shown or None) if value else self.label_off
        if value is None or self.label == "":
            return None
        if isinstance(value, float):
            if math.isnan(value):
                return None
            value = f"{value:g}"
        if not isinstance(value, (str, int)):
            return None
        return self.label.format(value=value) if self.label else f"{self.name}={value}"

    def parse(self, value: Any) -> Any:
        """``value`` (a string from the CLI, or a Python value) as this option's type; :class:`EdgeError` when it is
        not one, or not among the choices (matched case-insensitively, returned as declared)."""
        try:
            if self.type is bool:
                typed = option_bool(value)
            elif self.type is int and not isinstance(value, bool):
                typed = int(str(value).strip()) if isinstance(value, str) else int(value)
                if isinstance(value, float) and value != typed:
                    raise ValueError
            elif self.type is float and not isinstance(value, bool):
                typed = float(value)
            else:
                typed = self.type(value)
        except (TypeError, ValueError, EdgeError):
            raise EdgeError(f"option {self.name} must be {_TYPE_WORDS.get(self.type, self.type.__name__)}, "
                            f"got {value!r}") from None
        if self.choices is None:
            return typed
        for choice in self.choices:
            if str(choice).lower() == str(typed).lower():
                return choice
        raise EdgeError(f"unknown {self.name} {value!r} (choose from {', '.join(map(str, self.choices))})")


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def typed_options(backend: str, specs: Sequence[OptionSpec], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` checked against a backend's declared ``specs``: unknown names refused, each value parsed to its
    declared type (``None`` values dropped: the framework's default)."""
    by_name = {spec.name: spec for spec in specs}
    given = {k: v for k, v in dict(options or {}).items() if v is not None}
    if unknown := sorted(set(given) - set(by_name)):
        raise EdgeError(f"unknown {backend} option(s): {', '.join(unknown)} (choose from {', '.join(by_name)})")
    return {name: by_name[name].parse(value) for name, value in given.items()}


@dataclasses.dataclass(frozen=True)
class Bits:
    """What a configuration spends on its weights, known before quantizing: bits per weight (from the type, group
    size, ratio or recipe budget) and the method that spends them. Of one backend, configurations of one method
    order by fidelity as they order by ``bpw``: the search follows that order (:mod:`mlflow_edge.search.precision`)."""

    method: str
    bpw: float


@dataclasses.dataclass(frozen=True)
class StageNeed:
    """What one stage of the work is expected to need at its peak: resident memory of its process tree and disk it
    leaves written (:mod:`mlflow_edge.plan` checks them before any work), and the way out when they do not fit."""

    stage: str
    rss_bytes: int
    disk_bytes: int = 0
    way_out: str = ""


class Backend(Protocol):
    """One framework: convert, quantize, load; registered in the entry-point group ``mlflow_edge.backends``.

    The class attributes declare what the rest of mlflow-edge derives from: the CLI's choices, the target matrix,
    which flavor logs an artifact, what ``sweep`` tries, what a logged model's environment installs.
    """

    name: ClassVar[str]
    """The entry-point name; also the prefix of its params (``<name>.<option>``)."""
    format: ClassVar[str]
    """The conventions' ``format`` param of its artifacts (``gguf``, ``openvino_ir``, …)."""
    flavor: ClassVar[str]
    """Import path of the MLflow flavor module that logs and loads its artifacts."""
    requirements: ClassVar[tuple[str, ...]]
    """pip distributions its runtime needs to load and run an artifact (pinned to the installed versions when a
    model is logged)."""
    targets: ClassVar[Mapping[str, str]]
    """Hardware targets it serves: target name → ``"primary"`` or ``"secondary"`` (the CONVENTIONS matrix)."""
    base_precision: ClassVar[str]
    """The conversion precision quantization starts from by default (``f16``)."""
    sweep_types: ClassVar[tuple[str, ...]]
    """Quantization precisions ``mlflow-edge sweep`` tries when none are given."""
    native_serve_commands: ClassVar[tuple[str, ...]] = ()
    """The framework's own servers for a downloaded model, as shell command templates with ``{model}`` (the model
    file or folder), ``{port}`` and ``{name}`` (the registered model name); the readiness report of a promotion
    lists them. Empty when the framework has no server."""

    def convert_precisions(self) -> Sequence[str]:
        """Precisions ``convert`` writes directly from the HF checkpoint (e.g. ``f16``)."""
        ...

    def quantize_precisions(self) -> Sequence[str]:
        """Precisions ``quantize`` accepts, in the framework's own names (e.g. ``Q4_K_M``)."""
        ...

    def option_specs(self) -> Sequence[OptionSpec]:
        """The quantization options this backend accepts (names without the ``<backend>.`` prefix)."""
        ...

    def convert(self, source: "SourceModel", out_dir: Path, precision: str) -> Artifact:
        """Write ``source`` in this backend's format at ``precision`` into ``out_dir``."""
        ...

    def quantize(
        self,
        base: Artifact,
        out_dir: Path,
        precision: str,
        options: Mapping[str, Any] | None = None,
        calibration: "TextSlice | None" = None,
        source: "SourceModel | None" = None,
    ) -> Artifact:
        """Quantize ``base`` to ``precision`` into ``out_dir``; data-aware options read ``calibration``."""
        ...

    def load(self, artifact: Artifact, threads: int, context_tokens: int) -> Runner:
        """Load ``artifact`` into its runtime, ready for ``context_tokens`` tokens on ``threads`` threads."""
        ...

    def versions(self) -> Mapping[str, str]:
        """Framework versions, logged as ``version.<framework>`` tags."""
        ...

    def unsupported_reason(self, source: "SourceModel") -> str | None:
        """``None`` when this framework can convert ``source``'s architecture, else a one-line reason."""
        ...

    def open_artifact(self, path: Path, source: "SourceModel") -> Artifact | None:
        """``path`` (a file or folder on disk) as an artifact of this backend's format, converted from ``source``;
        ``None`` when it is not of this format; :class:`EdgeError` when it is but is corrupt. Its ``precision`` is
        what the files record (a quantization type where the format stores one, else the dominant weight type)."""
        ...

    def starting_points(self) -> Sequence[Mapping[str, Any]]:
        """The framework's usual defaults as :meth:`search_space` parameters (``{"llamacpp.precision": "Q4_K_M",
        …}``), and any configuration of its own a new study should see early (llama.cpp's budgeted ``MIXED`` recipe):
        a new study tries them first, so a search never ends without having seen what users pick by hand."""
        ...

    def precision_bits(self, precision: str, options: Mapping[str, Any], source: "SourceModel") -> Bits | None:
        """The :class:`Bits` of ``precision`` with ``options`` (as :meth:`search_space` returns them) on ``source``,
        ``None`` when they cannot be known before quantizing. Optional: a backend without it is searched in
        TPE's order alone."""
        ...

    def resource_needs(self, facts: Any) -> Sequence[StageNeed]:
        """The peak memory and disk of this backend's base conversion and of a typical quantization of it, for a
        source described by ``facts`` (:class:`mlflow_edge.plan.SourceFacts`: parameters, dtype, largest tensor).
        Optional: a backend without it is not planned for."""
        ...

    def search_space(self, trial: Any) -> tuple[str, dict[str, Any]]:
        """Sample a precision and quantization options from an Optuna ``trial``.

        Parameters are named ``<backend>.<option>`` (``llamacpp.precision``, ``llamacpp.imatrix``) so that spaces of
        different backends never collide in one study. Returns ``(precision, options)`` for :meth:`quantize`.
        """
        ...


def require(module: str, distribution: str, extra: str) -> Any:
    """``module`` imported, or a one-line :class:`EdgeError` naming the pip ``distribution`` that provides it and
    the mlflow-edge ``extra`` that installs it: a framework is imported only where it is used."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EdgeError(f"{distribution} is not installed: pip install 'mlflow-edge[{extra}]'") from exc


class BaseBackend:
    """What the built-in backends share, and a third-party backend may inherit: the :class:`Backend` Protocol's
    defaults (no native server, no optional method), typed options, the refusal to quantize a quantized base, and
    the :class:`Artifact` of a conversion or a quantization. A subclass sets the Protocol's class attributes and
    implements its methods."""

    name: ClassVar[str]
    format: ClassVar[str]
    native_serve_commands: ClassVar[tuple[str, ...]] = ()

    def typed(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """``options`` checked against :meth:`option_specs` and parsed to their declared types."""
        return typed_options(self.name, self.option_specs(), options)

    def refuse_quantized(self, base: Artifact, hint: str = "") -> None:
        """An :class:`EdgeError` when ``base`` is not one of :meth:`convert_precisions` (already quantized): the
        framework's quantizers start from float weights. ``hint`` replaces the default way out."""
        floats = [p.lower() for p in self.convert_precisions()]
        if base.precision.lower() not in floats:
            raise EdgeError(f"{Path(base.path).name} is already quantized ({base.precision}); "
                            f"{hint or 'quantize an ' + '/'.join(self.convert_precisions()) + ' conversion'}")

    def artifact(self, path: Path, precision: str, origin: "SourceModel | Artifact", options: Mapping[str, Any],
                 files: Sequence[Path]) -> Artifact:
        """This backend's :class:`Artifact` at ``path``; ``origin`` is the source it was converted from or the base
        artifact it was quantized from (its lineage carries over)."""
        if isinstance(origin, Artifact):
            lineage = (origin.source_name, origin.source_sha256, origin.num_parameters)
        else:
            lineage = (origin.name, origin.sha256, origin.num_parameters)
        return Artifact(path=Path(path), backend=self.name, format=self.format, precision=precision,
                        source_name=lineage[0], source_sha256=lineage[1], num_parameters=lineage[2],
                        options=dict(options), files=tuple(files))


OPTIONAL_MEMBERS = frozenset({"native_serve_commands", "precision_bits", "resource_needs"})
"""Members of :class:`Backend` a backend may leave out (the Protocol's default, or used where present)."""


def missing_members(backend_class: type) -> list[str]:
    """The :class:`Backend` attributes and methods ``backend_class`` lacks, optional ones aside."""
    declared = set(Backend.__annotations__) | {n for n, v in vars(Backend).items()
                                               if callable(v) and not n.startswith("_")}
    return sorted(n for n in declared - OPTIONAL_MEMBERS if not hasattr(backend_class, n))
