"""The public API: every name in ``moonprune.__all__`` is documented with a running example."""

from __future__ import annotations

import doctest
import inspect
import sys

import pytest

import moonprune

PUBLIC = [n for n in moonprune.__all__ if n not in ("__version__",)]


def test_all_names_resolve() -> None:
    for name in moonprune.__all__:
        assert hasattr(moonprune, name), name


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_running_example(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    obj = getattr(moonprune, name)
    module = (
        obj
        if inspect.ismodule(obj)
        else sys.modules[type(obj).__module__ if name == "MASKERS" else obj.__module__]
    )
    globs = {**vars(module), "moonprune": moonprune}  # as pytest --doctest-modules would
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs=globs)
    examples = [t for t in tests if t.examples]
    assert examples, f"{name} has no >>> example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in examples:
        runner.run(test)
    assert runner.failures == 0, f"{name}: {runner.failures} failing example(s)"
