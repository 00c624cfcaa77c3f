"""Hardware targets: the fingerprint of this machine, framework versions, and the target matrix of CONVENTIONS.md.

Every run carries :func:`hardware_fingerprint` (``hw.*`` tags) and :func:`framework_versions` (``version.*`` tags), so
numbers measured on different machines never get compared by accident. :data:`TARGETS` says which backends to try for
a deployment target, and :func:`is_measurable` whether this machine can measure it.

Example::

    >>> from mlflow_edge.targets import get_target, is_measurable, recommended_backends
    >>> recommended_backends("intel-cpu")  # the registered backends declaring it, primary first
    (...)
    >>> is_measurable("cpu")
    True
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

import psutil

from mlflow_edge.errors import EdgeError

HW_KEYS: tuple[str, ...] = ("hw.cpu_model", "hw.cpu_flags", "hw.cores", "hw.memory_gb", "hw.accelerator", "hw.os")

# Raw flag names (Linux /proc/cpuinfo, macOS sysctl, lower-cased) -> the name reported in ``hw.cpu_flags``.
_FLAG_ALIASES: dict[str, str] = {
    "avx": "avx",
    "avx1.0": "avx",
    "avx2": "avx2",
    "avx512f": "avx512",
    "avx512_vnni": "vnni",
    "avx512vnni": "vnni",
    "avx_vnni": "vnni",
    "avxvnni": "vnni",
    "amx_tile": "amx",
    "amx_int8": "amx",
    "amx_bf16": "amx",
    "amxtile": "amx",
    "f16c": "f16c",
    "fma": "fma",
    "neon": "neon",
    "asimd": "neon",
    "advsimd": "neon",
    "sve": "sve",
    "dotprod": "dotprod",
    "asimddp": "dotprod",
    "feat_dotprod": "dotprod",
}
_FLAG_ORDER: tuple[str, ...] = ("avx", "avx2", "avx512", "vnni", "amx", "f16c", "fma", "neon", "sve", "dotprod")

CORE_PACKAGES: tuple[str, ...] = ("mlflow", "optuna", "torch", "transformers")
"""Packages every run depends on; each backend adds the distributions it declares (``Backend.requirements``)."""


def _run(cmd: list[str]) -> str:
    """stdout of ``cmd``, or ``""`` when the binary is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def _cpuinfo() -> dict[str, str]:
    """First value of each key in /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip().lower(), value.strip())
    return info


def _cpu_model(info: dict[str, str]) -> str:
    model = info.get("model name") or info.get("hardware") or info.get("processor", "")
    if model and not model.isdigit():
        return model
    if platform.system() == "Darwin":
        model = _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
    return model or platform.processor() or platform.machine() or "unknown"


def canonical_flags(raw: Iterable[str]) -> str:
    """The ``hw.cpu_flags`` value for raw CPU feature names: known ones, renamed, in a fixed order; ``none`` if none."""
    found = {_FLAG_ALIASES[f.lower()] for f in raw if f.lower() in _FLAG_ALIASES}
    return ",".join(f for f in _FLAG_ORDER if f in found) or "none"


def _raw_flags(info: dict[str, str]) -> list[str]:
    # x86 Linux lists "flags", ARM Linux "Features".
    raw = (info.get("flags", "") + " " + info.get("features", "")).split()
    if platform.system() == "Darwin":
        raw += _run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"]).split()
        for line in _run(["sysctl", "hw.optional"]).splitlines():
            key, _, value = line.partition(":")
            if value.strip() == "1":
                raw.append(key.strip().rsplit(".", 1)[-1])
    return raw


def _intel_device(pattern: str) -> bool:
    """Whether a device node matching ``pattern`` belongs to an Intel (PCI vendor 0x8086) device."""
    for node in map(Path, glob.glob(pattern)):
        sys_class = {"dri": "drm"}.get(node.parent.name, node.parent.name)  # /dev/dri/X -> /sys/class/drm/X
        try:
            if (Path("/sys/class") / sys_class / node.name / "device" / "vendor").read_text().strip() == "0x8086":
                return True
        except OSError:
            continue
    return False


def _accelerators() -> str:
    found: list[str] = []
    found += [n.strip() for n in _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines() if n]
    if _intel_device("/dev/dri/renderD*"):
        found.append("Intel GPU")
    if _intel_device("/dev/accel/accel*"):
        found.append("Intel NPU")
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        found.append("mps")
    return ", ".join(found) or "none"


def hardware_fingerprint() -> dict[str, str]:
    """The ``hw.*`` tags of this machine, all strings; computed once per process, a fresh dict each call.

    ``hw.cores`` is the logical CPU count (``os.cpu_count()``), the number of threads a runtime sees, not physical
    cores. ``hw.memory_gb`` is total RAM in GB of 1e9 bytes (like ``size_mb``), one decimal. ``hw.accelerator`` is
    ``none`` or a comma-separated list of NVIDIA GPU names, ``Intel GPU``, ``Intel NPU``, ``mps``.
    """
    return dict(_fingerprint())


@functools.cache
def _fingerprint() -> dict[str, str]:
    info = _cpuinfo()
    return {
        "hw.cpu_model": _cpu_model(info),
        "hw.cpu_flags": canonical_flags(_raw_flags(info)),
        "hw.cores": str(os.cpu_count() or psutil.cpu_count(logical=True) or 1),
        "hw.memory_gb": f"{psutil.virtual_memory().total / 1e9:.1f}",
        "hw.accelerator": _accelerators(),
        "hw.os": platform.platform(),
    }


def default_packages() -> tuple[str, ...]:
    """The core packages and every registered backend's runtime requirements."""
    from mlflow_edge.backends import loadable_backends

    extra = [name for backend in loadable_backends() for name in backend.requirements]
    return tuple(dict.fromkeys([*CORE_PACKAGES, *extra]))


def framework_versions(packages: Iterable[str] | None = None) -> dict[str, str]:
    """``version.<name>`` tags (``-`` in a distribution name becomes ``_``) for the installed ``packages``
    (default: :func:`default_packages`)."""
    packages = default_packages() if packages is None else packages
    versions: dict[str, str] = {}
    for name in packages:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        versions[f"version.{name.lower().replace('-', '_').replace('.', '_')}"] = version
    return versions


@dataclasses.dataclass(frozen=True)
class Target:
    """One row of the hardware target matrix: what hardware measures it. Which backends serve it, each backend
    declares itself (``Backend.targets``)."""

    name: str
    requires: str
    notes: str

    @property
    def primary(self) -> tuple[str, ...]:
        return _serving(self.name, "primary")

    @property
    def secondary(self) -> tuple[str, ...]:
        return _serving(self.name, "secondary")


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("intel-cpu", "an Intel CPU", ""),
        Target("intel-gpu", "an Intel GPU (/dev/dri)", "measured only on that hardware"),
        Target("intel-npu", "an Intel NPU (/dev/accel)", "measured only on that hardware"),
        Target("nvidia-gpu", "an NVIDIA GPU (nvidia-smi)", "CUDA builds of the runtimes"),
        Target("apple-silicon", "macOS on arm64", "Metal"),
        Target("arm-cpu", "an arm64/aarch64 CPU", ""),
        Target("arm-mobile", "an arm64/aarch64 CPU", "phone-class device"),
        Target("cpu", "any CPU", "the default; what this machine measures"),
    )
}


def _serving(target: str, rank: str) -> tuple[str, ...]:
    from mlflow_edge.backends import loadable_backends

    return tuple(b.name for b in loadable_backends() if b.targets.get(target) == rank)


def get_target(name: str | Target) -> Target:
    """The target called ``name``; :class:`EdgeError` for an unknown one."""
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        raise EdgeError(f"unknown target '{name}' (choose from {', '.join(TARGETS)})") from None


def recommended_backends(target: str | Target) -> tuple[str, ...]:
    """Backends to try for ``target``: primary first, then secondary."""
    t = get_target(target)
    return t.primary + t.secondary


def is_measurable(target: str | Target, fingerprint: dict[str, str] | None = None) -> bool:
    """Whether the machine described by ``fingerprint`` (default: this one) can measure ``target``."""
    name = get_target(target).name
    fp = hardware_fingerprint() if fingerprint is None else fingerprint
    cpu = fp.get("hw.cpu_model", "").lower()
    accel = fp.get("hw.accelerator", "").lower()
    os_name = fp.get("hw.os", "").lower()
    arm = any(a in os_name for a in ("aarch64", "arm64", "armv")) or "neon" in fp.get("hw.cpu_flags", "").split(",")
    checks = {
        "cpu": True,
        "intel-cpu": "intel" in cpu,
        "intel-gpu": "intel gpu" in accel,
        "intel-npu": "intel npu" in accel,
        "nvidia-gpu": "nvidia" in accel,
        "apple-silicon": "mps" in accel or (os_name.startswith(("macos", "darwin")) and "arm64" in os_name),
        "arm-cpu": arm,
        "arm-mobile": arm,
    }
    return checks[name]
