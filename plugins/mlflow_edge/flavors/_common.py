"""What every mlflow-edge flavor does the same way, so that a flavor module keeps only what its format needs.

- **Save and log** (:func:`save_model`, :func:`log_model`), as MLflow's own flavors do (``mlflow.onnx``,
  ``mlflow.sklearn``): the flavor validates its files and copies them in; this module writes the signature, the input
  example, ``Model.metadata``, the loader code (this package, under ``code/``), the ``python_function`` and flavor
  entries of ``MLmodel`` and the environment files, and removes a half-written model directory. The environment
  names mlflow, the runtime's packages and what the loader imports, pinned to the installed versions: never
  mlflow-edge itself, which no package index has.
- **The request contract** of every flavor's pyfunc (:data:`CONTRACT`, the ParamSchema of :func:`default_signature`):
  OpenAI's parameter names and defaults plus ``chat``; :func:`parse_request` refuses an unknown or out-of-range param
  with ``MlflowException(INVALID_PARAMETER_VALUE)``, a 400 under ``mlflow models serve``. One string in per prompt, one
  generated string out.
- **Sampling** for runtimes that only give logits (:func:`sample_next_token`, :func:`generate`); a runtime with its
  own sampler (llama.cpp) maps the contract onto it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Collection, Iterator, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
import yaml
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils.file_utils import get_total_file_size, write_to

from mlflow_edge import cache
from mlflow_edge.errors import EdgeError
from mlflow_edge.flavors import _mlflow_compat
from mlflow_edge.flavors._mlflow_compat import (
    CONDA_ENV_FILE_NAME,
    CONSTRAINTS_FILE_NAME,
    PYTHON_ENV_FILE_NAME,
    REQUIREMENTS_FILE_NAME,
    PythonEnv,
    conda_env_with,
    copy_code_paths,
    pinned_requirement,
    prepare_save_path,
    process_conda_env,
    process_pip_requirements,
    save_example,
    validate_env_arguments,
)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The ``mlflow_edge`` package folder: it travels with every model as ``code/mlflow_edge``, so the loader imports."""

LOADER_REQUIREMENTS = ("numpy", "pandas")
"""pip distributions the loader modules import besides mlflow and the format's runtime."""

# -- the request contract -------------------------------------------------------------------------------------------
CONTRACT: tuple[ParamSpec, ...] = (
    ParamSpec("max_tokens", "long", 64),  # at most the model's context
    ParamSpec("temperature", "double", 0.0),  # 0: greedy
    ParamSpec("top_p", "double", 1.0),  # in (0, 1]; 1: off
    ParamSpec("top_k", "long", 0),  # 0: off
    ParamSpec("stop", "string", [], (-1,)),  # strings that end the text (not returned)
    ParamSpec("seed", "long", 0),  # the sampling seed, in [0, 2**32)
    ParamSpec("repetition_penalty", "double", 1.0),  # > 0; 1: off
    ParamSpec("chat", "boolean", False),  # apply the model's chat template to the prompt
)
"""The generation params of every flavor's pyfunc, with their defaults: declared here once."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked generation request (the fields of :data:`CONTRACT`)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int
    repetition_penalty: float
    chat: bool


def params_schema() -> ParamSchema:
    return ParamSchema(list(CONTRACT))


def default_signature() -> ModelSignature:
    """One string column (the prompts) in, one string per prompt out, and the request contract as params.

    The input column is unnamed on purpose: MLflow's schema enforcement turns a list of strings (and serving's
    ``{"inputs": [...]}``) into a DataFrame with column ``0``, which a column named ``prompt`` would reject; an unnamed
    column accepts that and ``{"prompt": ...}`` / ``dataframe_records`` alike.
    """
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=params_schema())


def _refuse(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _shown(value: Any) -> str:
    """``value`` as a message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_param_names(params: Mapping[str, Any] | None, declared: Sequence[str]) -> None:
    """Refuse params whose names are not ``declared`` (MLflow would drop them with a warning)."""
    if unknown := sorted(str(name) for name in (params or {}) if name not in declared):
        raise _refuse(f"unknown param{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                      f"(known: {', '.join(sorted(declared))})")


def parse_request(params: Mapping[str, Any] | None, context_tokens: int) -> Request:
    """``params`` checked against the contract; a missing or ``None`` param takes its default.

    ``max_tokens`` may not exceed ``context_tokens`` (the loaded model's context size).
    """
    if params is not None and not isinstance(params, Mapping):
        raise _refuse(f"params must be a mapping, got {type(params).__name__}")
    check_param_names(params, [spec.name for spec in CONTRACT])
    values = {spec.name: spec.default for spec in CONTRACT}
    values.update({name: value for name, value in (params or {}).items() if value is not None})
    return Request(
        max_tokens=_integer("max_tokens", values["max_tokens"], 1, int(context_tokens), "the model's context"),
        temperature=_number("temperature", values["temperature"], lambda v: v >= 0, ">= 0"),
        top_p=_number("top_p", values["top_p"], lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=_integer("top_k", values["top_k"], 0, 2**31 - 1),
        stop=_stop(values["stop"]),
        seed=_integer("seed", values["seed"], 0, 2**32 - 1),
        repetition_penalty=_number("repetition_penalty", values["repetition_penalty"], lambda v: v > 0, "> 0"),
        chat=_boolean("chat", values["chat"]),
    )


def _integer(name: str, value: Any, low: int, high: int, high_name: str = "") -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _refuse(f"{name} must be an integer, got {_shown(value)}")
    if not low <= value <= high:
        limit = f"{high} ({high_name})" if high_name else str(high)
        raise _refuse(f"{name} must be from {low} to {limit}, got {value}")
    return int(value)


def _number(name: str, value: Any, accept: Callable[[float], bool], rule: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise _refuse(f"{name} must be a number, got {_shown(value)}")
    if not (math.isfinite(value) and accept(float(value))):
        raise _refuse(f"{name} must be a finite number {rule}, got {value}")
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _refuse(f"{name} must be true or false, got {_shown(value)}")
    return bool(value)


def _stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise _refuse(f"stop must be a list of non-empty strings, got {_shown(value)}")
    return tuple(value)


def refuse_undeclared_params(loader_module: str) -> None:
    """Models whose pyfunc loader is ``loader_module`` refuse undeclared params in ``predict`` instead of MLflow
    dropping them (:func:`mlflow_edge.flavors._mlflow_compat.refuse_undeclared_params`)."""
    _mlflow_compat.refuse_undeclared_params(loader_module, check_param_names)


# -- prompts --------------------------------------------------------------------------------------------------------
def prompts(model_input: Any) -> list[str]:
    """Prompts from a DataFrame (``prompt`` or first column), a Series/array/list of str, a str or ``{"prompt": …}``."""
    if isinstance(model_input, pd.DataFrame):
        values = _frame_prompts(model_input)
    elif isinstance(model_input, dict):
        if "prompt" not in model_input:
            raise _refuse("dict input needs a 'prompt' key")
        values = model_input["prompt"]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        values = [v["prompt"] if isinstance(v, dict) and "prompt" in v else v for v in np.ravel(model_input).tolist()]
    else:
        raise _refuse(f"unsupported input type {type(model_input).__name__}; "
                      "pass a DataFrame, a list of str, a str or a dict")
    if bad := [type(v).__name__ for v in values if not isinstance(v, str)]:
        raise _refuse(f"prompts must be strings, got {bad[0]}")
    return values


def _frame_prompts(frame: pd.DataFrame) -> list[Any]:
    if frame.shape[1] == 0:
        raise _refuse("input DataFrame has no columns; expected 'prompt'")
    column = "prompt" if "prompt" in frame.columns else frame.columns[0]
    values: list[Any] = []
    for value in frame[column].tolist():  # MLflow turns {"prompt": [a, b]} into one cell holding a list
        if isinstance(value, np.ndarray):
            value = value.tolist()
        values.extend(value if isinstance(value, list) else [value])
    return values


# -- generation: one streaming loop for every flavor ----------------------------------------------------------------
FINISH_STOP = "stop"  # an end-of-sequence token or a stop string ended the text
FINISH_LENGTH = "length"  # max_tokens or the context ended it


@dataclasses.dataclass
class Completion:
    """What one generation produced: its text, token counts, why it ended and when its first token came."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = FINISH_LENGTH
    started: float = 0.0  # time.perf_counter() when generation began
    first_token_at: float | None = None  # time.perf_counter() when the first token was sampled
    ended: float = 0.0


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become a stop string (or finish a UTF-8 character)."""
    if text.endswith("\ufffd"):  # a token boundary inside a multi-byte character: wait for the rest
        return len(text) - len(text.rstrip("\ufffd"))
    longest = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-size:]):
                longest = size
                break
    return longest


def _cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """``text`` before the first stop string in it, or ``None`` when it holds none."""
    found = [index for index in (text.find(s) for s in stop) if index >= 0]
    return text[: min(found)] if found else None


def stream_text(tokens: Iterator[int], request: Request, eos: Collection[int], decode: Callable[[list[int]], str],
                limit: int, completion: Completion, cancelled: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """Text deltas of the generation that ``tokens`` samples: at most ``limit`` tokens, ending before a token in
    ``eos`` or a stop string (never returned; text that could begin one is held back until it cannot). ``completion``
    receives the text, the counts and the finish reason; ``cancelled()`` ends it early (a client went away)."""
    generated: list[int] = []
    emitted = ""
    completion.finish_reason = FINISH_LENGTH
    try:
        for token in tokens:
            if completion.first_token_at is None:
                completion.first_token_at = time.perf_counter()
            if token in eos:
                completion.finish_reason = FINISH_STOP
                break
            generated.append(token)
            text = decode(generated)
            if request.stop and (cut := _cut_at_stop(text, request.stop)) is not None:
                completion.finish_reason, text = FINISH_STOP, cut
                break
            ready = text[: len(text) - _held_back(text, request.stop)]
            if ready.startswith(emitted) and len(ready) > len(emitted):
                yield ready[len(emitted):]
                emitted = ready
            if len(generated) >= limit or cancelled():
                break
        else:
            text = decode(generated)
        if not generated:
            text = ""
        completion.text = text
        if text.startswith(emitted) and len(text) > len(emitted):
            yield text[len(emitted):]
    finally:
        completion.completion_tokens = len(generated)
        completion.ended = time.perf_counter()


class TextGenerator:
    """The pyfunc face every flavor's model shares: prompts in, one generated string per prompt out (``predict``),
    and the streaming interface the OpenAI-compatible server drives (``prompt_ids``, ``chat_ids``, ``stream``).

    A flavor gives the runtime's primitives: ``context_tokens``, ``encode``, ``decode``, ``sample`` (token ids after
    a prompt, sampled under the request; the runtime's own sampler or :func:`sample_next_token`), ``eos_token_ids``
    and, for chat, ``chat_template`` and ``special_tokens``. One sequence at a time: ``stream`` holds a lock, since
    servers may call ``predict`` concurrently.
    """

    eos_token_ids: frozenset[int] = frozenset()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._compiled_chat_template: Any = None

    # what a flavor implements
    @property
    def context_tokens(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def sample(self, ids: list[int], request: Request) -> Iterator[int]:
        raise NotImplementedError

    @property
    def chat_template(self) -> str | None:
        return None

    @property
    def special_tokens(self) -> dict[str, str]:
        """Token strings a chat template may use (``bos_token``, ``eos_token``)."""
        return {}

    # what every flavor shares
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        """One completion per prompt; ``params`` as :data:`CONTRACT` declares."""
        request = parse_request(params, self.context_tokens)
        return [self.complete(self.prompt_ids(prompt, request.chat), request).text for prompt in prompts(model_input)]

    def prompt_ids(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of a plain prompt, or of a one-message chat when ``chat``."""
        if chat:
            return self.chat_ids([{"role": "user", "content": prompt}])
        return self._checked(self.encode(prompt, add_special_tokens=True))

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of ``messages`` rendered by the model's own chat template (in a sandbox)."""
        if self._compiled_chat_template is None:
            if not self.chat_template:
                raise _refuse("this model has no chat template")
            self._compiled_chat_template = compile_chat_template(self.chat_template)
        text = render_chat(self._compiled_chat_template, messages, self.special_tokens)
        return self._checked(self.encode(text, add_special_tokens=False))

    def stream(self, ids: list[int], request: Request, completion: Completion | None = None,
               cancelled: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Text deltas generated after the prompt ``ids``; ``completion`` receives the totals."""
        completion = completion if completion is not None else Completion()
        room = self.context_tokens - len(ids)
        if room < 1:
            raise _refuse(f"the prompt of {len(ids)} tokens does not fit the context of {self.context_tokens}")
        completion.prompt_tokens = len(ids)
        with self._lock:
            completion.started = time.perf_counter()
            tokens = self.sample(ids, request)
            try:
                yield from stream_text(tokens, request, self.eos_token_ids, self.decode,
                                       min(request.max_tokens, room), completion, cancelled)
            finally:
                tokens.close()

    def complete(self, ids: list[int], request: Request) -> Completion:
        completion = Completion()
        for _ in self.stream(ids, request, completion):
            pass
        return completion

    @staticmethod
    def _checked(ids: Sequence[int]) -> list[int]:
        if not ids:
            raise _refuse("the prompt is empty")
        return [int(i) for i in ids]


# -- chat templates, rendered in a sandbox --------------------------------------------------------------------------
def compile_chat_template(template: str) -> Any:
    """``template`` compiled in Jinja's immutable sandbox (as transformers and llama.cpp's server render them):
    no attribute access to Python internals, no mutation of the messages."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise _refuse(f"the model's chat template does not compile: {str(exc).splitlines()[0]}") from exc


def render_chat(template: Any, messages: Sequence[Mapping[str, Any]], special_tokens: Mapping[str, str]) -> str:
    """The prompt text of ``messages`` (``role`` and string ``content`` each) under the compiled ``template``."""
    from jinja2 import TemplateError

    for message in messages:
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise _refuse("each chat message needs a string 'role' and 'content'")
    try:
        return template.render(messages=[dict(m) for m in messages], add_generation_prompt=True,
                               **dict(special_tokens))
    except TemplateError as exc:  # includes the sandbox's SecurityError
        raise _refuse(f"the model's chat template refused the messages: {str(exc).splitlines()[0]}") from exc


# -- generation for logits-only runtimes ----------------------------------------------------------------------------
class LogitsRunner(Protocol):
    """A runtime that appends tokens to one sequence and returns their logits (e.g. the OpenVINO runner)."""

    @property
    def context_tokens(self) -> int: ...

    def reset(self) -> None: ...

    def forward(self, tokens: Sequence[int]) -> np.ndarray: ...


def sample_next_token(logits: np.ndarray, request: Request, rng: np.random.Generator, seen: set[int]) -> int:
    """Greedy at ``temperature`` 0, else a sample; repetition penalty (on ``seen``), temperature, top-k, top-p."""
    penalty = request.repetition_penalty
    if penalty == 1.0 and request.temperature == 0:
        return int(np.argmax(logits))
    scores = np.array(logits, dtype=np.float64)
    if penalty != 1.0 and seen:
        index = np.fromiter(seen, dtype=np.int64)
        values = scores[index]
        scores[index] = np.where(values > 0, values / penalty, values * penalty)
    if request.temperature == 0:
        return int(scores.argmax())
    scores /= request.temperature
    if 0 < request.top_k < scores.size:
        cutoff = np.partition(scores, -request.top_k)[-request.top_k]
        scores[scores < cutoff] = -np.inf
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if request.top_p < 1:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < request.top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def sample_tokens(runner: LogitsRunner, ids: Sequence[int], request: Request) -> Iterator[int]:
    """Tokens after the prompt ``ids``, sampled by :func:`sample_next_token`; seeded per prompt, as llama.cpp is."""
    rng = np.random.default_rng(request.seed)
    runner.reset()
    logits = runner.forward(ids)[-1]
    seen = set(ids)
    while True:
        token = sample_next_token(logits, request, rng, seen)
        yield token
        seen.add(token)
        logits = runner.forward([token])[-1]


def generate(runner: LogitsRunner, ids: Sequence[int], request: Request, eos: Collection[int],
             decode: Callable[[list[int]], str]) -> str:
    """The text generated after the prompt ``ids`` (at most ``request.max_tokens`` tokens, clipped to the context)."""
    room = runner.context_tokens - len(ids)
    if room < 1:
        raise _refuse(f"the prompt of {len(ids)} tokens does not fit the context of {runner.context_tokens}")
    completion = Completion()
    for _ in stream_text(sample_tokens(runner, ids, request), request, eos, decode, min(request.max_tokens, room),
                         completion):
        pass
    return completion.text


class LogitsModelWrapper(TextGenerator):
    """The pyfunc face of a model whose runtime gives logits only (a :class:`LogitsRunner`), sampled by
    :func:`sample_next_token`. ``tokenizer`` is a Hugging Face tokenizer (or one that forwards to it, as mlx-lm's
    does); a runtime with another tokenizer overrides ``encode``, ``decode`` and the chat properties."""

    def __init__(self, runner: LogitsRunner, tokenizer: Any, eos_token_ids: Collection[int]) -> None:
        super().__init__()
        self._runner = runner
        self._tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)

    def get_raw_model(self) -> LogitsRunner:
        """The underlying runner."""
        return self._runner

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def context_tokens(self) -> int:
        return self._runner.context_tokens

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def sample(self, ids: list[int], request: Request) -> Iterator[int]:
        return sample_tokens(self._runner, ids, request)

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    @property
    def special_tokens(self) -> dict[str, str]:
        return {name: value for name in ("bos_token", "eos_token")
                if isinstance(value := getattr(self._tokenizer, name, None), str)}


# -- save, log, load ------------------------------------------------------------------------------------------------
def default_conda_env(pip_requirements: list[str]) -> dict[str, Any]:
    """The conda environment of a flavor's models: MLflow's default with ``pip_requirements``."""
    return conda_env_with(pip_requirements)


def pip_requirements(runtime: Sequence[str]) -> list[str]:
    """``runtime`` (the backend's ``requirements``) and :data:`LOADER_REQUIREMENTS`, pinned to the installed
    versions; MLflow adds ``mlflow`` itself."""
    return [pinned_requirement(name) for name in dict.fromkeys([*runtime, *LOADER_REQUIREMENTS])]


def save_model(path: str | os.PathLike, flavor: ModuleType, write_files: Callable[[Path], dict[str, Any]], *,
               model_config: dict[str, Any] | None = None, conda_env: dict | str | None = None,
               code_paths: list[str] | None = None, mlflow_model: Model | None = None,
               signature: ModelSignature | None = None, input_example: Any = None,
               pip_requirements: list[str] | str | None = None, extra_pip_requirements: list[str] | str | None = None,
               metadata: dict[str, Any] | None = None) -> None:
    """Save a model of ``flavor`` (its module) into the new or empty directory ``path``.

    ``write_files(path)`` copies the format's files in and returns the flavor config: ``data`` (the model file or
    folder, relative to ``path``) and whatever the format records; ``model_config`` is the pyfunc loader's config.
    The keyword arguments after it are MLflow's usual ``save_model`` arguments. Callers validate their input first:
    nothing is written before this runs, and nothing half-written stays behind when it fails.
    """
    validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    if metadata is not None:
        mlflow_model.metadata = metadata
    mlflow_model.metadata = _json_copy(mlflow_model.metadata, "metadata")
    path = os.path.abspath(path)
    created = not os.path.exists(path)
    prepare_save_path(path)
    try:
        code = copy_code_paths([*(code_paths or []), str(PACKAGE_DIR)], path)
        mlflow_model.signature = signature if signature is not None else default_signature()
        if input_example is not None:
            save_example(mlflow_model, input_example, path)
        conf = write_files(Path(path))
        pyfunc.add_to_model(mlflow_model, loader_module=flavor.__name__, data=conf["data"], code=code,
                            conda_env=CONDA_ENV_FILE_NAME, python_env=PYTHON_ENV_FILE_NAME,
                            model_config=model_config)
        mlflow_model.add_flavor(flavor.FLAVOR_NAME, code=code, **conf)
        if size := get_total_file_size(path):
            mlflow_model.model_size_bytes = size
        mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))
        write_environment(path, conda_env, pip_requirements, extra_pip_requirements,
                          flavor.get_default_pip_requirements)
    except BaseException:
        _remove_written(Path(path), created)
        raise


def _remove_written(path: Path, created: bool) -> None:
    """Never leave a half-written model directory behind (an empty one given by the caller stays, empty)."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _json_copy(value: Any, name: str) -> Any:
    """A plain JSON copy of ``value`` (tuples become lists), or a one-line refusal naming ``name``."""
    if value is None:
        return None
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise _refuse(f"{name} must be JSON-serializable: {exc}") from exc


def write_environment(path: str, conda_env: dict | str | None, pip_requirements: list[str] | str | None,
                      extra_pip_requirements: list[str] | str | None,
                      default_requirements: Callable[[], list[str]]) -> None:
    """``conda.yaml``, ``requirements.txt``, ``constraints.txt`` and ``python_env.yaml`` in the model dir ``path``,
    as MLflow's own flavors write them (``default_requirements`` unless the caller gives requirements)."""
    if conda_env is None:
        default_reqs = default_requirements() if pip_requirements is None else None
        conda_env, pip_requirements, pip_constraints = process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, pip_constraints = process_conda_env(conda_env)
    with open(os.path.join(path, CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    PythonEnv.current().to_yaml(os.path.join(path, PYTHON_ENV_FILE_NAME))


def log_model(flavor: ModuleType, name: str | None, **kwargs: Any) -> ModelInfo:
    """``Model.log`` with ``flavor``: the model in the active run (or a new one). ``kwargs`` are the flavor's
    ``save_model`` arguments and ``Model.log``'s own (``artifact_path``, ``registered_model_name``, ``metadata``,
    ``params``, ``tags``, ``model_type``, ``step``, ``model_id``, ``run_id``, ``await_registration_for``)."""
    return Model.log(artifact_path=kwargs.pop("artifact_path", None), name=name, flavor=flavor, **kwargs)


def flavor_conf(model_dir: str | os.PathLike, flavor_name: str) -> dict[str, Any]:
    """The ``flavor_name`` entry of the ``MLmodel`` in ``model_dir``."""
    conf = Model.load(str(model_dir)).flavors.get(flavor_name)
    if conf is None:
        raise MlflowException.invalid_parameter_value(f"the model at {model_dir} has no '{flavor_name}' flavor")
    return conf


def copy_model_folder(target: Path, data: str, files: Sequence[Path], model_names: Sequence[str]) -> dict[str, Any]:
    """``files`` copied into the new folder ``target/data``; the flavor config naming it, its model files
    (``model_names``) and their SHA-256s (checked at load by :func:`check_model_files`)."""
    model_dir = target / data
    model_dir.mkdir()
    for file in files:
        shutil.copyfile(file, model_dir / file.name)
    return folder_conf(model_dir, data, model_names)


def folder_conf(model_dir: Path, data: str, model_names: Sequence[str]) -> dict[str, Any]:
    """The flavor config of the model folder ``data`` (at ``model_dir``): its model files and their SHA-256s."""
    return {"data": data, "model_files": list(model_names),
            "model_sha256": {name: cache.sha256_file(model_dir / name) for name in model_names}}


def runtime_settings(settings: Mapping[str, Any], **parsers: Callable[[str, Any], Any]) -> dict[str, Any]:
    """``settings`` checked, those that are ``None`` left out: each key by its parser in ``parsers``, the others
    (``max_context``, ``threads``) by :func:`runtime_count`."""
    return {key: parsers.get(key, runtime_count)(key, value) for key, value in settings.items() if value is not None}


def runtime_choice(choices: Sequence[str], normalize: Callable[[str], str]) -> Callable[[str, Any], str]:
    """A parser for :func:`runtime_settings`: the setting normalized (``str.upper`` …), one of ``choices``."""
    def parse(key: str, value: Any) -> str:
        text = normalize(str(value))
        if text not in choices:
            raise MlflowException.invalid_parameter_value(f"{key} must be one of {', '.join(choices)}, got {value}")
        return text
    return parse


def runtime_count(key: str, value: Any) -> int:
    """A runtime setting that counts (``max_context`` from 1, ``threads`` from 0: the runtime's default) as an
    integer; anything less is MLflow's invalid-parameter error."""
    count = int(value)
    if count < (1 if key == "max_context" else 0):
        raise MlflowException.invalid_parameter_value(f"{key} must be positive, got {value}")
    return count


def check_model_files(folder: str | os.PathLike, recorded: Mapping[str, str] | None) -> None:
    """The model files in ``folder`` named by ``recorded`` (relative path → the sha256 the flavor config recorded when
    the model was saved) must still have that hash: a truncated or altered file is a one-line error before a runtime
    maps it (runtimes refuse some damage with unclear messages and load flipped weights without a word)."""
    for relative, expected in (recorded or {}).items():
        path = cache.inside(Path(folder), relative, f"the MLmodel file of {folder}")
        if not path.is_file():
            raise EdgeError(f"model file {relative} is missing from {folder}")
        if cache.sha256_file(path) != expected:
            raise EdgeError(f"model file {relative} in {folder} is truncated or altered: its sha256 differs from the "
                            "one recorded when the model was saved")


def download_model(model_uri: str, dst_path: str | None = None) -> Path:
    """The model at ``model_uri`` as a local directory."""
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(artifact_uri=model_uri, dst_path=dst_path))
