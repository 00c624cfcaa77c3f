"""Targets: the real fingerprint of this machine, framework versions, and the target matrix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlflow_edge.backends import backend_names, get_backend
from mlflow_edge.errors import EdgeError
from mlflow_edge.targets import (
    HW_KEYS,
    TARGETS,
    Target,
    canonical_flags,
    framework_versions,
    get_target,
    hardware_fingerprint,
    is_measurable,
    recommended_backends,
)

CONVENTIONS = Path("/work/shared/CONVENTIONS.md")


def test_fingerprint_has_exactly_the_hw_keys_as_strings() -> None:
    fp = hardware_fingerprint()
    assert set(fp) == set(HW_KEYS) == {
        "hw.cpu_model", "hw.cpu_flags", "hw.cores", "hw.memory_gb", "hw.accelerator", "hw.os"
    }
    assert all(isinstance(v, str) and v for v in fp.values())
    assert int(fp["hw.cores"]) > 0
    assert float(fp["hw.memory_gb"]) > 0 and re.fullmatch(r"\d+\.\d", fp["hw.memory_gb"])
    assert "x86_64" in fp["hw.os"] or "aarch64" in fp["hw.os"] or "arm64" in fp["hw.os"]


def test_fingerprint_is_cached_and_copied() -> None:
    fp = hardware_fingerprint()
    fp["hw.cores"] = "mutated"
    assert hardware_fingerprint()["hw.cores"] != "mutated"


def test_canonical_flags_renames_and_orders() -> None:
    raw = ["sse2", "fma", "avx512_vnni", "avx2", "avx512f", "amx_tile", "amx_int8", "AVX", "asimd", "asimddp"]
    assert canonical_flags(raw) == "avx,avx2,avx512,vnni,amx,fma,neon,dotprod"
    assert canonical_flags(["sse2"]) == "none"


def test_cpu_is_measurable_here() -> None:
    assert is_measurable("cpu")
    assert is_measurable(get_target("cpu"))


def test_is_measurable_from_a_given_fingerprint() -> None:
    intel = {"hw.cpu_model": "Intel(R) Xeon(R) Platinum 8480+", "hw.accelerator": "NVIDIA H100 80GB HBM3",
             "hw.os": "Linux-6.1-x86_64-with-glibc2.36", "hw.cpu_flags": "avx,avx2,avx512,vnni,amx"}
    assert is_measurable("intel-cpu", intel) and is_measurable("nvidia-gpu", intel)
    assert not is_measurable("arm-cpu", intel) and not is_measurable("apple-silicon", intel)
    assert not is_measurable("intel-gpu", intel) and not is_measurable("intel-npu", intel)
    mac = {"hw.cpu_model": "Apple M2", "hw.accelerator": "mps", "hw.os": "macOS-14.4-arm64-arm-64bit",
           "hw.cpu_flags": "neon,dotprod"}
    assert is_measurable("apple-silicon", mac) and is_measurable("arm-cpu", mac) and is_measurable("arm-mobile", mac)
    assert not is_measurable("intel-cpu", mac) and not is_measurable("nvidia-gpu", mac)


def test_unknown_target_raises_with_the_name() -> None:
    with pytest.raises(EdgeError, match="tpu-v9") as info:
        get_target("tpu-v9")
    assert "\n" not in str(info.value) and "intel-cpu" in str(info.value)
    with pytest.raises(EdgeError):
        is_measurable("tpu-v9")


def test_every_conventions_target_is_present() -> None:
    assert set(TARGETS) == {
        "intel-cpu", "intel-gpu", "intel-npu", "nvidia-gpu", "apple-silicon", "arm-cpu", "arm-mobile", "cpu"
    }
    if CONVENTIONS.exists():  # the shared conventions file, when this checkout has it beside
        section = CONVENTIONS.read_text().split("## Hardware targets")[1].split("\n## ")[0]
        rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
        assert {n for cell in rows for n in re.findall(r"`([a-z-]+)`", cell)} == set(TARGETS)
    for t in TARGETS.values():
        assert isinstance(t, Target) and set(t.primary + t.secondary) <= set(backend_names())


def test_recommended_backends_come_from_the_backends_own_declarations() -> None:
    for name in backend_names():
        for target, rank in get_backend(name).targets.items():
            if target in TARGETS:
                assert name in getattr(TARGETS[target], rank)
    for target in TARGETS:
        ranks = [get_backend(b).targets[target] for b in recommended_backends(target)]
        assert ranks == sorted(ranks, key=("primary", "secondary").index)  # primary first
    assert recommended_backends("cpu"), "every CPU backend serves the default target"


def test_framework_versions() -> None:
    versions = framework_versions()
    assert re.fullmatch(r"\d+\.\d+.*", versions["version.mlflow"])
    assert all(k.startswith("version.") and "-" not in k for k in versions)
    assert framework_versions(["mlflow", "no-such-package-xyz"]).keys() == {"version.mlflow"}
    assert framework_versions(["typing-extensions"]).keys() == {"version.typing_extensions"}
