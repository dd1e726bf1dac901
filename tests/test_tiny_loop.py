"""The loops in C (``stagepool._tinyloop``) against the same loops in Python: the worker's item
loop (``_worker_loop.run_chunk``: the same values, errors at the same offsets, each item's
offset in the record before it runs, the same stops: a budget, a forked child) and the parent's
bounded read of a chunk from an iterator (``_reading.read_within``)."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import stagepool as sp
from stagepool import _reading, _worker_loop
from stagepool._worker_loop import F_OFFSET, Scratch, run_chunk


@pytest.fixture(params=["c", "python"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "python":
        monkeypatch.setattr(_worker_loop, "_c_loop", None)
    yield request.param


def test_the_c_loop_is_built() -> None:
    """The install compiles it (a compiler is part of the test machine's set-up); without it
    tiny items run ~15% slower, with nothing else to show for it."""
    assert importlib.util.find_spec("stagepool._tinyloop") is not None
    assert _worker_loop._c_loop is not None


class _Picky:
    """Raises for the items in ``bad``; returns each other item times two."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    def __call__(self, x: int) -> int:
        if x in self.bad:
            raise ValueError(f"bad {x}")
        return 2 * x


@given(n=st.integers(0, 300), data=st.data())
def test_both_loops_give_the_same_values_and_errors(n: int, data: st.DataObject) -> None:
    bad = set(data.draw(st.lists(st.integers(0, max(0, n - 1)), max_size=8))) if n else set()
    results = []
    for c_loop in (_worker_loop._c_loop, None):
        saved = _worker_loop._c_loop
        _worker_loop._c_loop = c_loop
        try:
            result = run_chunk(_Picky(bad), list(range(n)), per_item_clock=False)
        finally:
            _worker_loop._c_loop = saved
        results.append((result.values, sorted((result.errors or {}).items(),
                                              key=lambda kv: kv[0])))
    (values, errors), (py_values, py_errors) = results
    assert values == py_values == [None if i in bad else 2 * i for i in range(n)]
    assert [o for o, _ in errors] == [o for o, _ in py_errors] == sorted(bad)
    assert [e.message for _, e in errors] == [e.message for _, e in py_errors]


def test_each_items_offset_is_in_the_record_before_it_runs(loop: str) -> None:
    record = Scratch()
    result = run_chunk(lambda _: int(record.ints[F_OFFSET]), [None] * 500, record=record,
                       per_item_clock=False)
    assert result.values == list(range(500))


def test_an_emptied_list_ends_the_loop_after_the_running_item(loop: str) -> None:
    """What the budget thread and a forked child's at-fork hook do: the item running finishes,
    the rest never starts."""
    items: list[Any] = list(range(100))

    def empty_at_10(x: int) -> int:
        if x == 10:
            items.clear()
        return x

    result = run_chunk(empty_at_10, items, per_item_clock=False)
    assert result.values == list(range(11)) and result.errors is None


def test_bad_arguments_are_refused_by_the_c_loop() -> None:
    c_loop = _worker_loop._c_loop
    assert c_loop is not None
    with pytest.raises(TypeError):
        c_loop(abs, (1, 2), [], Scratch().ints, F_OFFSET)  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        c_loop(abs, [1], [], Scratch().ints, 99)
    with pytest.raises(BufferError):
        c_loop(abs, [1], [], b"read-only", 0)


class _Boom(Exception):
    pass


def _stream(sizes: list[int], fail_at: int | None) -> Iterator[Any]:
    """Ints (size 0) and memoryviews of the given sizes; raises _Boom at ``fail_at``."""
    for i, size in enumerate(sizes):
        if i == fail_at:
            raise _Boom(i)
        yield memoryview(bytes(size)) if size else i


def _read(reader: Any, sizes: list[int], fail_at: int | None, size: int,
          max_bytes: int) -> tuple[list[Any], Any, bool, list[Any]]:
    it = _stream(sizes, fail_at)
    into: list[Any] = []
    try:
        over, raised = reader(it, size, max_bytes, into), False
    except _Boom:
        over, raised = _reading.NOTHING, True
    rest: list[Any] = []
    try:
        rest.extend(it)
    except _Boom:
        rest.append("boom")
    return ([_key(x) for x in into], over if over is _reading.NOTHING else _key(over), raised,
            [_key(x) for x in rest])


def _key(x: Any) -> Any:
    return ("mv", x.nbytes) if isinstance(x, memoryview) else x


@given(sizes=st.lists(st.sampled_from([0, 0, 0, 1, 5, 40]), max_size=30),
       fail=st.one_of(st.none(), st.integers(0, 30)), size=st.integers(1, 40),
       max_bytes=st.integers(0, 60))
def test_both_bounded_reads_take_the_same_items(sizes: list[int], fail: int | None, size: int,
                                                max_bytes: int) -> None:
    """The parent's read of a chunk from an iterator within a byte bound: the C loop and the
    chained iterators take the same items, return the same one over the bound, leave the same
    rest, and let the iterator's exception through after the items read before it."""
    assert _reading._c_read is not None
    c = _read(_reading.read_within, sizes, fail, size, max_bytes)
    python = _read(_reading._chained, sizes, fail, size, max_bytes)
    assert c == python


class _SizedBadly:
    """An item whose ``nbytes`` is broken in one of the ways a user's class can break it."""

    def __init__(self, i: int, how: str) -> None:
        self.i, self.how = i, how

    @property
    def nbytes(self) -> Any:
        if self.how == "raises":
            raise RuntimeError(f"the file behind item {self.i} is closed")
        return {"float": 1.5, "none": None, "str": "12", "negative": -(1 << 40),
                "huge": 1 << 80, "numpy": np.int64(1 << 40)}[self.how]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_index_of, (self.i,))


def _index_of(i: int) -> int:
    return i


def _number(item: int | _SizedBadly) -> int:
    """The item's number, pickled (an int) or not (the serial backend hands over the object)."""
    return item if isinstance(item, int) else item.i


@pytest.mark.parametrize("how", ["raises", "float", "none", "str", "negative", "huge"])
@pytest.mark.parametrize("reader", ["c", "python"])
def test_an_items_broken_nbytes_counts_zero_and_fails_nothing(
        engine: sp.Engine, how: str, reader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounded read looks at ``nbytes`` on its own account: one that raises, or is not an
    integer, must not end the batch (it did: the RuntimeError propagated from map with item 7
    lost; in Python a float or None compared NotImplemented, a DeprecationWarning, or raised
    TypeError in the sum); nor must a negative or a huge one."""
    if reader == "python":
        monkeypatch.setattr(_reading, "_c_read", None)
    items = (_SizedBadly(i, how if i >= 7 else "numpy") for i in range(300))
    report = engine.map(_number, items)
    assert report.values == list(range(300))


class _Sized:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


@pytest.mark.parametrize("sizes", [[1, (1 << 63) - 1, 5, 5], [-(1 << 63), -1, 5, 5],
                                   [-(1 << 70), 5, 5], [1 << 70, 5], [0, 1 << 64, 5]])
def test_sizes_past_64_bits_are_summed_as_python_sums_them(sizes: list[int]) -> None:
    """The C loop sums in a long long: 1 + (2**63 - 1) overflowed to a negative total and took
    every item after it, -2**70 was read as past the bound; the Python read sums exactly."""
    taken = []
    for reader in (_reading.read_within, _reading._chained):
        into: list[Any] = []
        over = reader(iter([_Sized(n) for n in sizes]), 10, 1000, into)
        taken.append(([x.nbytes for x in into], None if over is _reading.NOTHING else over.nbytes))
    assert taken[0] == taken[1]


class _NumpySized:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = np.int64(nbytes)


@pytest.mark.parametrize("reader", ["c", "python"])
def test_numpy_integer_sizes_count_and_negative_ones_count_zero(reader: str) -> None:
    """An array library may give ``nbytes`` as a numpy integer: it counts like an int (it
    counted 0, so such arrays were read past the bound). A negative size is a broken one and
    counts 0 (it counted against the total and let the items after it through)."""
    read = _reading.read_within if reader == "c" else _reading._chained
    into: list[Any] = []
    over = read(iter([_NumpySized(60), _NumpySized(30), _NumpySized(60), _Sized(1)]), 10, 100,
                into)
    assert [int(x.nbytes) for x in into] == [60, 30] and int(over.nbytes) == 60
    into = []
    over = read(iter([_Sized(-1000), _Sized(60), _Sized(60), _Sized(1)]), 10, 100, into)
    assert [x.nbytes for x in into] == [-1000, 60] and over.nbytes == 60


class _SizedTuple(tuple):  # type: ignore[type-arg]
    """A tuple that says its own size: its parts are not looked at."""

    nbytes = 7


def _shaped(kind: str, size: int) -> Any:
    part = memoryview(bytes(size))
    return {"int": size, "view": part, "pair": (size, part), "list": [part, part],
            "deep": ((part,),), "wide": (*[memoryview(bytes(1))] * 16, part),
            "own-size": _SizedTuple((part,))}[kind]


@given(shapes=st.lists(st.tuples(st.sampled_from(["int", "view", "pair", "list", "deep", "wide",
                                                  "own-size"]),
                                 st.sampled_from([0, 1, 5, 40])), max_size=30),
       size=st.integers(1, 40), max_bytes=st.integers(0, 60))
def test_both_bounded_reads_count_tuple_and_list_items_alike(
        shapes: list[tuple[str, int]], size: int, max_bytes: int) -> None:
    """A tuple or list item without an ``nbytes`` counts its first 16 parts' (deeper ones and
    later ones are not seen; a tuple with its own ``nbytes`` counts that): both readers take
    the same items and stop at the same one."""
    items = [_shaped(kind, n) for kind, n in shapes]
    taken = []
    for reader in (_reading.read_within, _reading._chained):
        into: list[Any] = []
        over = reader(iter(items), size, max_bytes, into)
        taken.append(([id(x) for x in into], id(over)))
    assert taken[0] == taken[1]


@pytest.mark.parametrize("reader", ["c", "python"])
def test_meta_and_array_pairs_count_their_arrays(reader: str) -> None:
    """``(meta, array)`` items (a segment and its samples) were read by count alone: a read
    after small items pulled ~150 segments of 4 MiB into the parent at once."""
    read = _reading.read_within if reader == "c" else _reading._chained
    into: list[Any] = []
    pairs = [(i, np.zeros(8)) for i in range(4)]  # 64 bytes each
    over = read(iter(pairs), 10, 150, into)
    assert into == pairs[:2] and over is pairs[2]


def test_a_builtin_fn_turning_slow_still_stops_at_the_budget(loop: str) -> None:
    """A builtin (math.factorial) runs no eval loop, which is where the GIL goes to a thread
    that asked for it: the C loop ran all 50 slow items of ~15 ms past a 20 ms budget (the
    budget thread never got the GIL), so a map's slow tail all ran on one worker."""
    items = [10] * 3000 + [20000] * 50
    result = run_chunk(math.factorial, items, per_item_clock=False, budget=0.02)
    assert 3000 < len(result.values) < 3000 + 25, len(result.values)
    assert result.errors is None
