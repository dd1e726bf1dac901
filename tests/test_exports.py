"""The public surface: exactly the names in ``stagepool.__all__``, nothing leaks, all typed."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import stagepool as sp

PUBLIC_MODULES = {"cli", "demo"}  # the command line and the demo workload are public by design


def test_all_is_a_sorted_tuple_of_importable_names() -> None:
    assert isinstance(sp.__all__, tuple)
    assert list(sp.__all__) == sorted(sp.__all__)
    for name in sp.__all__:
        assert getattr(sp, name) is not None, name


def test_no_public_name_leaks() -> None:
    leaked = {
        name for name in dir(sp)
        if not name.startswith("_") and name not in sp.__all__ and name not in PUBLIC_MODULES
    }
    assert not leaked, f"public names missing from __all__ (or to be made private): {leaked}"


def test_every_implementation_module_is_private() -> None:
    for info in pkgutil.walk_packages(sp.__path__, "stagepool."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf == "__main__":  # runs the command line when imported
            continue
        assert leaf.startswith("_") or leaf in PUBLIC_MODULES, info.name
        importlib.import_module(info.name)


def test_public_names_are_documented_and_typed() -> None:
    for name in sp.__all__:
        obj = getattr(sp, name)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
    assert (Path(sp.__file__).parent / "py.typed").exists()


def test_exports_table_matches_all() -> None:
    assert set(sp._EXPORTS) == set(sp.__all__)


@pytest.mark.parametrize("module", ["stagepool._worker", "stagepool._probe",
                                    "stagepool._pipeline._runner"])
def test_a_worker_import_stays_light(module: str) -> None:
    import subprocess
    import sys

    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('numpy', 'psutil', 'tqdm', 'loky', 'stagepool._engine') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_classes_name_the_package() -> None:
    import inspect

    for name in sp.__all__:
        obj = getattr(sp, name)
        if inspect.isclass(obj):
            assert obj.__module__ == "stagepool", name
            assert getattr(sp, obj.__qualname__) is obj  # pickling by reference finds it
    assert repr(sp.TaskTimeout("x")) == "TaskTimeout('x')"
    assert "stagepool.TaskTimeout" in "".join(
        __import__("traceback").format_exception_only(sp.TaskTimeout("x")))
