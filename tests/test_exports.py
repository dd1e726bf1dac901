"""The public surface: exactly the names in ``stagepool.__all__``, nothing leaks, all typed."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

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
