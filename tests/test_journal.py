"""The checkpoint journal on its own (real files in tmp_path): round trip, side files, a torn
tail cut off, corruption refused, another call's journal refused, one run at a time."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stagepool as sp
from stagepool._journal import (
    JOURNAL_NAME,
    MAGIC,
    SIDE_DIR,
    Entry,
    Journal,
    check_checkpoint,
)

HEADER = {"function": "tests.f#1", "keys": "index+content"}
OK = frozenset({"ok"})


def _entry(value: object) -> Entry:
    return Entry(value, None, None, 0.5, 123, 1)


def _write(directory: Path, n: int, header: dict[str, str] = HEADER) -> None:
    journal = Journal(directory, header, "refuse")
    journal.append([(f"k{i}", "ok", _entry(i * 10)) for i in range(n)])
    journal.close()


def test_round_trip_with_an_array_in_a_side_file(tmp_path: Path) -> None:
    big = np.arange(300_000, dtype=np.float64)  # 2.4 MB: out of band, in a side file
    journal = Journal(tmp_path, HEADER, "refuse")
    journal.append([("a", "ok", _entry(big)), ("b", "ok", _entry({"x": 1})),
                    (("seg.wav", 0.0, 2.0), "error", Entry(None, ValueError("bad"), "tb", 0.1,
                                                          7, 2))])
    journal.close()
    assert len(list((tmp_path / SIDE_DIR).iterdir())) == 1

    again = Journal(tmp_path, HEADER, "refuse")
    kind, entry = again.finished("a", OK)  # type: ignore[misc]
    assert kind == "ok" and np.array_equal(entry.value, big)
    entry.value[0] = -1.0  # the caller's own, writable array
    assert again.finished("b", OK) == ("ok", _entry({"x": 1}))
    assert again.finished(("seg.wav", 0.0, 2.0), OK) is None  # an error is not finished...
    kind, entry = again.finished(("seg.wav", 0.0, 2.0), frozenset({"ok", "error"}))  # type: ignore[misc]
    assert kind == "error" and str(entry.error) == "bad" and entry.attempts == 2  # ...unless asked
    again.close()


def test_a_key_journaled_twice_counts_by_its_last_record(tmp_path: Path) -> None:
    journal = Journal(tmp_path, HEADER, "refuse")
    journal.append([("a", "error", Entry(None, ValueError("x"), None, 0.0, None, 1))])
    journal.append([("a", "ok", _entry(5))])
    journal.close()
    again = Journal(tmp_path, HEADER, "refuse")
    assert again.finished("a", OK) == ("ok", _entry(5))
    again.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=200), zeros=st.integers(0, 64))
def test_a_torn_last_record_is_dropped_and_appends_follow_the_good_data(
        tmp_path_factory: pytest.TempPathFactory, cut: int, zeros: int) -> None:
    directory = tmp_path_factory.mktemp("torn")
    _write(directory, 5)
    path = directory / JOURNAL_NAME
    whole = path.read_bytes()
    last = Journal(directory, HEADER, "refuse")
    last.append([("k5", "ok", _entry(50))])
    last.close()
    record = len(path.read_bytes()) - len(whole)
    # The last record's write cut short (a crash), or followed by zeros the file system
    # allocated and never wrote (a power cut).
    torn = path.read_bytes()[:len(whole) + max(0, record - cut)] + b"\0" * zeros
    path.write_bytes(torn)

    journal = Journal(directory, HEADER, "refuse")
    assert all(journal.finished(f"k{i}", OK) == ("ok", _entry(i * 10)) for i in range(5))
    assert journal.finished("k5", OK) is None
    journal.append([("k6", "ok", _entry(60))])
    journal.close()
    assert Journal(directory, HEADER, "refuse").finished("k6", OK) == ("ok", _entry(60))


@pytest.mark.parametrize(("where", "message"), [("header", "its header record is bad"),
                                                 ("record", "corrupt at byte")])
def test_a_bad_record_followed_by_good_ones_is_corruption(tmp_path: Path, where: str,
                                                          message: str) -> None:
    _write(tmp_path, 5)
    path = tmp_path / JOURNAL_NAME
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
    offset = len(MAGIC) + 8 + (10 if where == "header" else header_length + 20)
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(sp.CheckpointError, match=message):
        Journal(tmp_path, HEADER, "refuse")


@pytest.mark.parametrize("record", [0, 2])  # the header's length field, a middle record's
def test_a_damaged_length_field_does_not_swallow_the_records_after_it(tmp_path: Path,
                                                                      record: int) -> None:
    """A length that now points past the end of the file looks like a torn last record; the
    whole records after it say it is not one (they were once silently cut off, or deleted)."""
    _write(tmp_path, 5)
    path = tmp_path / JOURNAL_NAME
    data = bytearray(path.read_bytes())
    offset = len(MAGIC)
    for _ in range(record):
        offset += 8 + int.from_bytes(data[offset:offset + 4], "little")
    data[offset + 2] ^= 0xFF  # the record now claims ~16 MiB
    path.write_bytes(bytes(data))
    with pytest.raises(sp.CheckpointError, match="corrupt"):
        Journal(tmp_path, HEADER, "refuse")
    assert path.read_bytes() == bytes(data)  # nothing cut off


def test_side_files_no_record_names_are_deleted(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    orphan = tmp_path / SIDE_DIR / "dead.buf"
    orphan.write_bytes(b"x" * 10)
    (tmp_path / SIDE_DIR / "half.buf.tmp").write_bytes(b"x")
    Journal(tmp_path, HEADER, "refuse").close()
    assert list((tmp_path / SIDE_DIR).iterdir()) == []


def test_a_journal_of_another_function_is_refused_unless_asked(tmp_path: Path) -> None:
    _write(tmp_path, 3)
    other = {**HEADER, "function": "tests.g#2"}
    for check in (lambda: check_checkpoint(tmp_path, other, "refuse"),
                  lambda: Journal(tmp_path, other, "refuse")):
        with pytest.raises(sp.CheckpointError, match=r"written for function 'tests\.f#1'.*"
                           r"checkpoint_mismatch='restart'"):
            check()
    reused = Journal(tmp_path, other, "reuse")
    assert reused.finished("k1", OK) == ("ok", _entry(10))
    reused.close()
    restarted = Journal(tmp_path, other, "restart")
    assert restarted.finished("k1", OK) is None
    restarted.close()
    Journal(tmp_path, other, "refuse").close()  # the journal is now the other function's


def test_a_journal_without_records_binds_no_later_call(tmp_path: Path) -> None:
    """A call refused at the door (a key= that raises) has opened its journal and written its
    header, but nothing else; the corrected call was then refused as 'another function's'."""
    Journal(tmp_path, HEADER, "refuse").close()
    other = {**HEADER, "keys": "key=tests.fixed#2"}
    check_checkpoint(tmp_path, other, "refuse")
    journal = Journal(tmp_path, other, "refuse")
    journal.append([("k1", "ok", _entry(10))])
    journal.close()
    with pytest.raises(sp.CheckpointError, match=r"written for keys 'key=tests\.fixed#2'"):
        Journal(tmp_path, HEADER, "refuse")  # once it holds results, it is that call's


def test_one_run_at_a_time(tmp_path: Path) -> None:
    first = Journal(tmp_path, HEADER, "refuse")
    with pytest.raises(sp.CheckpointError, match="in use by another running batch"):
        Journal(tmp_path, HEADER, "refuse")
    first.close()
    Journal(tmp_path, HEADER, "refuse").close()  # released on close


def test_a_directory_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(sp.CheckpointError, match="a-file/ckpt' is not a writable directory") as info:
        check_checkpoint(blocker / "ckpt", HEADER, "refuse")
    assert isinstance(info.value.__cause__, OSError)


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_bytes(b"something else entirely")
    with pytest.raises(sp.CheckpointError, match="is not a stagepool journal"):
        check_checkpoint(tmp_path, HEADER, "refuse")


def test_an_outcome_that_will_not_pickle_is_left_out(tmp_path: Path) -> None:
    journal = Journal(tmp_path, HEADER, "refuse")
    journal.append([("lock", "ok", _entry(lambda: 1)), ("fine", "ok", _entry(1))])
    journal.close()
    again = Journal(tmp_path, HEADER, "refuse")
    assert again.finished("lock", OK) is None and again.finished("fine", OK) is not None
    again.close()


def test_the_record_layout_is_the_documented_one(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    data = (tmp_path / JOURNAL_NAME).read_bytes()
    assert data.startswith(MAGIC)
    offset = len(MAGIC)
    lengths = []
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 4], "little")
        lengths.append(length)
        offset += 8 + length
    assert offset == len(data) and len(lengths) == 2
    header = pickle.loads(data[len(MAGIC) + 8:len(MAGIC) + 8 + lengths[0]])
    assert header == {"format": 1, **HEADER}
    key, kind, sides, body = pickle.loads(data[len(MAGIC) + 16 + lengths[0]:])
    assert (key, kind, sides) == ("k0", "ok", ()) and pickle.loads(body) == _entry(0)
    os.sync()
