"""The C-pickler fast path of single calls (``_backends/_plain.py``): the same bytes as the usual
cloudpickle path wherever it is taken, and never taken for what cloudpickle pickles by value."""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import pytest

from stagepool import _transport
from stagepool._backends._plain import PlainPickler


def usual(obj: object) -> bytes:
    return _transport.dumps(obj, threshold=0, owner=1, creator="p")


@pytest.mark.parametrize("call", [
    [(operator.mul, (6, 7), {})],
    [(math.sqrt, (2.0,), {})],
    [(usual, ("text", b"bytes", None, True, 1.5, 2j), {"key": [1, 2]})],
], ids=["operator", "builtin", "nested"])
def test_plain_calls_pickle_as_cloudpickle_does(call: list[Any]) -> None:
    plain = PlainPickler().dumps(call)
    assert plain == usual(call)
    assert _transport.loads(plain, unlink=False) == call


def local_function() -> None:
    pass


@pytest.mark.parametrize("call", [
    [(lambda x: x, (1,), {})],
    [(functools.partial(operator.mul, 2), (1,), {})],
    [(operator.mul, (object(),), {})],
    [(operator.mul, ({1: 2},), {})],  # a dict with a non-str key
    [(operator.mul, tuple(range(100)), {})],  # too long to check cheaply
], ids=["lambda", "partial", "object", "int-keyed-dict", "long"])
def test_anything_else_goes_the_usual_way(call: list[Any]) -> None:
    assert PlainPickler().dumps(call) is None


def test_a_closure_is_not_remembered() -> None:
    pickler = PlainPickler()

    def closure() -> None:
        pass

    assert pickler.dumps([(closure, (), {})]) is None
    assert pickler.dumps([(test_a_closure_is_not_remembered, (), {})]) is not None
    assert list(pickler._functions) == [test_a_closure_is_not_remembered]


def test_a_function_of_a_module_registered_by_value_goes_the_usual_way() -> None:
    import sys

    import cloudpickle

    me = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(me)
    try:
        assert PlainPickler().dumps([(local_function, (), {})]) is None
    finally:
        cloudpickle.unregister_pickle_by_value(me)


def test_a_function_found_by_name_pickles_bare_as_cloudpickle_does() -> None:
    """The function of every map and submit: the C pickler's bytes when cloudpickle would write
    the same (by reference), None for what it pickles by value."""
    from stagepool._worker import dumps

    plain = PlainPickler()
    assert plain.function(usual) == dumps(usual)
    def closure() -> None:
        pass
    for by_value in (lambda x: x, closure, functools.partial(usual, 1), math.sqrt):
        assert plain.function(by_value) is None
