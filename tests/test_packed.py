"""Lists of plain ints or floats travel packed (``_transport.packed``, ``_tinyloop.pack``): the raw
bytes of an array instead of one pickle opcode per item. The promise tested here is that nothing
but the speed changes: every list comes back equal, with the same type for every item (a bool
stays a bool, an int subclass or a numpy scalar stays what it was), through the transport, a
worker's answer, and a real engine.

The speed is measured by ``benchmarks.tiny_ab`` (packing on and off is an internal A/B: see the
closing note of issue 15), not here.
"""

from __future__ import annotations

import enum
import math
import os
import sys
from array import array
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stagepool as sp
from stagepool import _transport
from stagepool._compiled import tinyloop
from stagepool._shm import parse
from stagepool._worker import ChunkResult, decoded_result, encode_result

needs_c = pytest.mark.skipif(tinyloop is None, reason="the C extension was not built")


def roundtrip(values: Any) -> Any:
    blob = _transport.dumps(values, threshold=0, owner=os.getpid(), creator="p")
    return _transport.loads(blob, unlink=False)


def same(got: list[Any], want: list[Any]) -> bool:
    """Equal item by item, with the same type; NaN equals NaN, and -0.0 is not 0.0."""
    if type(got) is not list or len(got) != len(want):
        return False
    for a, b in zip(got, want, strict=True):
        if type(a) is not type(b):
            return False
        if isinstance(a, float):
            if not (math.isnan(a) and math.isnan(b)) and (a != b or
                                                          math.copysign(1, a) != math.copysign(1, b)):
                return False
        elif a != b:
            return False
    return True


class Level(enum.IntEnum):
    LOW = 1


N = _transport.PACK_MIN + 16  # long enough to travel packed

EDGES = [-2**63, -2**31 - 1, -2**31, -32769, -32768, -129, -128, -1, 0, 1, 127, 128, 255, 256,
         32767, 32768, 65535, 65536, 2**31 - 1, 2**31, 2**63 - 1,
         # where an int stops being one 30-bit digit, read directly by pack()
         -2**30 - 1, -2**30, -2**30 + 1, 2**30 - 1, 2**30, 2**30 + 1, -2**60, 2**60]


@needs_c
@pytest.mark.parametrize("edge", EDGES)
def test_ints_at_every_width_boundary_come_back_equal(edge: int) -> None:
    values = [0] * N + [edge]
    got = roundtrip(values)
    assert same(got, values)
    width = {1: "b", 2: "h", 4: "i", 8: "q"}
    fits = next(w for w in (1, 2, 4, 8) if -(2 ** (8 * w - 1)) <= edge < 2 ** (8 * w - 1))
    assert tinyloop.pack(values) is not None
    assert tinyloop.pack(values)[0] == width[fits]  # the narrowest that holds it


@needs_c
def test_floats_keep_their_bits() -> None:
    values = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, sys.float_info.max, 0.1] * (N // 8)
    got = roundtrip(values)
    assert same(got, values)
    assert b"_unpacked" in _transport.dumps(values, threshold=0, owner=os.getpid(), creator="p")


@needs_c
def test_a_long_list_of_ints_travels_packed_and_a_short_one_does_not() -> None:
    def blob(values: list[Any]) -> bytes:
        return _transport.dumps(values, threshold=0, owner=os.getpid(), creator="p")

    assert b"_unpacked" in blob(list(range(_transport.PACK_MIN)))
    assert b"_unpacked" not in blob(list(range(_transport.PACK_MIN - 1)))


@pytest.mark.parametrize("values", [
    [True, False] * (N // 2),  # bools are ints to array('q'): they would come back 1 and 0
    [Level.LOW] * N,  # an int subclass
    [np.int64(3)] * N,  # numpy scalars index like ints
    [np.float64(0.5)] * N,  # a float subclass
    [1] * N + [1.0],  # a mix
    [1.0] * N + [1],
    [1] * N + [2**63],  # past 64 bits
    [1] * N + [-2**63 - 1],
    [1] * N + [None],
    [1] * N + [True],
    [0.5] * N + [False],
], ids=["bools", "intenum", "np.int64", "np.float64", "int-then-float", "float-then-int",
        "2**63", "-2**63-1", "None", "int-then-bool", "float-then-bool"])
def test_anything_else_is_pickled_as_it_is(values: list[Any]) -> None:
    if tinyloop is not None:
        assert tinyloop.pack(values) is None
    assert same(roundtrip(values), values)


SCALARS = st.one_of(st.integers(), st.integers(-300, 300), st.floats(), st.booleans())


def lists(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """Short lists, and lists just long enough to travel packed."""
    return st.one_of(st.lists(elements, max_size=300),
                     st.lists(elements, min_size=_transport.PACK_MIN, max_size=N))


@given(st.one_of(lists(st.integers(-2**70, 2**70)), lists(st.floats(allow_nan=True)),
                 lists(st.integers(-300, 300)), lists(SCALARS)))
@settings(max_examples=300, deadline=None)
def test_any_list_of_scalars_round_trips_with_its_types(values: list[Any]) -> None:
    assert same(roundtrip(values), values)
    result = ChunkResult(values, array("d", [0.0, 1.0]), None, 7)
    assert same(decoded_result(_transport.loads(encode_result(result), unlink=False)).values,
                values)


@needs_c
def test_a_packed_list_is_pickled_to_the_bytes_cloudpickle_would_write() -> None:
    """The C pickler writes packed lists (cloudpickle's set-up cost more than packing saved on
    short lists): the same bytes, alone (a chunk of items) and in a worker's answer."""
    values = list(range(N))
    answer = (_transport.packed(values), b"stamps", None, 7)
    for obj, want in ((values, _transport.packed(values)), (answer, answer)):
        blob = _transport.dumps(obj, threshold=1 << 20, owner=os.getpid(), creator="p",
                                read_only=True)
        names, offset = parse(blob)
        assert not names
        assert blob[offset:] == _transport.dumps_plain(want)


def test_the_other_byte_order_is_swapped_back() -> None:
    values = [1, -2, 300, 70000, -2**40]
    packed = array("q", values)
    packed.byteswap()
    other = "big" if sys.byteorder == "little" else "little"
    assert _transport._unpacked("q", other, packed.tobytes()) == values


def _is_even(x: int) -> bool:
    return x % 2 == 0


def _kinds(x: int) -> Any:
    return [x, x * 0.5, x > 3, np.int64(x), Level.LOW][x % 5]


def test_an_engine_gives_back_the_types_its_function_returned() -> None:
    """Real workers both ways: items packed by the parent, values packed by the workers."""
    with sp.Engine(workers=2) as engine:
        evens = engine.map(_is_even, range(1_000), chunk_size=500, timeout=30)
        assert evens.values == [x % 2 == 0 for x in range(1_000)]
        assert all(type(v) is bool for v in evens.values)
        roots = engine.map(math.sqrt, [float(x) for x in range(1_000)], chunk_size=500)
        assert roots.values == [math.sqrt(x) for x in range(1_000)]
        assert all(type(v) is float for v in roots.values)
        mixed = engine.map(_kinds, list(range(1_000)), chunk_size=500, timeout=30)
        want = [_kinds(x) for x in range(1_000)]
        assert [type(v) for v in mixed.values] == [type(v) for v in want]
        assert mixed.values == want
        big = engine.map(abs, [-(2**62) + x for x in range(1_000)], chunk_size=500, timeout=30)
        assert big.values == [2**62 - x for x in range(1_000)]
