"""The public API: every name in ``moonprune.__all__`` is documented with a running example."""

from __future__ import annotations

import doctest
import inspect
import sys

import pytest

import moonprune

#: served lazily from moonprune.exporters (``import moonprune`` does not load onnx)
LAZY = ["RejectingClassifier", "export_onnx"]
PUBLIC = [n for n in moonprune.__all__ if n not in ("__version__",)] + LAZY


def test_all_names_resolve() -> None:
    for name in [*moonprune.__all__, *LAZY]:
        assert hasattr(moonprune, name), name


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_running_example(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    obj = getattr(moonprune, name)
    module = (
        obj
        if inspect.ismodule(obj)
        else sys.modules[type(obj).__module__ if name in ("MASKERS", "SCORES") else obj.__module__]
    )
    globs = {**vars(module), "moonprune": moonprune}  # as pytest --doctest-modules would
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs=globs)
    examples = [t for t in tests if t.examples]
    assert examples, f"{name} has no >>> example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in examples:
        runner.run(test)
    assert runner.failures == 0, f"{name}: {runner.failures} failing example(s)"


def test_importing_the_library_loads_neither_exporters_nor_cli() -> None:
    """``import moonprune`` stays a library: the exporters (onnx) and the CLI (typer)
    load only when used; the lazy names still resolve to the exporter's objects."""
    import subprocess

    code = (
        "import sys, moonprune\n"
        "bad = [m for m in sys.modules if m.startswith(('moonprune.exporters', "
        "'moonprune.cli', 'onnx', 'typer'))]\n"
        "assert not bad, bad\n"
        "from moonprune.exporters import export_onnx\n"
        "assert moonprune.export_onnx is export_onnx\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moonprune.nope  # noqa: B018
