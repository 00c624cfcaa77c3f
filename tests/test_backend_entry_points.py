"""The entry-point group refuses what would make the set of backends ambiguous or broken, in one line naming both
parties, as pluggy refuses a second plugin of one name: a name two distributions claim, a backend lacking a member
of the Protocol, two backends writing one format."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlflow_edge import backends
from mlflow_edge.backends import EdgeError, backend_for_format, backend_names, get_backend, loadable_backends

PLUGIN_CODE = textwrap.dedent("""
    from mlflow_edge.backends.llamacpp import LlamaCppBackend


    class Impostor(LlamaCppBackend):
        pass


    class HalfDone:
        name = "halfdone"
        format = "halfdone_format"

        def convert(self, source, out_dir, precision):
            raise NotImplementedError


    class GGUFTwin(LlamaCppBackend):
        name = "gguf_twin"
""")


def _distribution(site: Path, entries: dict[str, str]) -> Path:
    """A distribution ``fake-edge`` in ``site`` (a dist-info folder and one module) registering ``entries``."""
    info = site / "fake_edge-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-edge\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entries.items())
    (info / "entry_points.txt").write_text(f"[{backends.ENTRY_POINT_GROUP}]\n{lines}")
    (site / "fake_edge_backends.py").write_text(PLUGIN_CODE)
    return site


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install a fake distribution's entry points for one test (the discovery caches cleared before and after)."""
    def install(entries: dict[str, str]) -> Path:
        site = _distribution(tmp_path / "site", entries)
        monkeypatch.syspath_prepend(str(site))
        _clear()
        return site

    yield install
    _clear()


def _clear() -> None:
    backends._entry_points.cache_clear()
    backends._backend_class.cache_clear()


def test_a_name_claimed_by_two_distributions_is_refused_naming_both(installed):
    installed({"llamacpp": "fake_edge_backends:Impostor"})
    with pytest.raises(EdgeError) as caught:
        backend_names()
    message = str(caught.value)
    assert "backend 'llamacpp' is registered twice" in message and "fake-edge" in message
    assert "mlflow" in message.replace("fake-edge", "") and "\n" not in message


def test_a_backend_lacking_protocol_members_is_refused_by_name(installed):
    installed({"halfdone": "fake_edge_backends:HalfDone"})
    with pytest.raises(EdgeError, match=r"backend 'halfdone' \(fake_edge_backends:HalfDone, from fake-edge\) lacks "
                                        r"the Backend member\(s\) base_precision, .*quantize"):
        get_backend("halfdone")
    assert "halfdone" not in {b.name for b in loadable_backends()}  # the rest stay usable


def test_two_backends_writing_one_format_are_refused(installed):
    pytest.importorskip("gguf")
    installed({"gguf_twin": "fake_edge_backends:GGUFTwin"})
    with pytest.raises(EdgeError, match=r"backends 'gguf_twin' \(from fake-edge\) and 'llamacpp' \(from mlflow.edge\) "
                                        r"both write format 'gguf'; uninstall one"):
        backend_for_format("gguf")


def test_the_cli_says_it_in_one_line(installed):
    site = installed({"llamacpp": "fake_edge_backends:Impostor"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "mlflow_edge.cli", "quant-types"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.startswith("mlflow-edge: error: backend 'llamacpp' is registered twice"), done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1
