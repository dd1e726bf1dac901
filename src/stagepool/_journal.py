"""The checkpoint journal: every finished outcome of a batch, durably, so a rerun can skip it.

A checkpoint is a directory::

    <checkpoint>/journal.spj        the journal: MAGIC, then records, append-only
    <checkpoint>/side/<hex>.buf     big buffers (numpy arrays >= SIDE_FILE_BYTES) of one record

File format of ``journal.spj`` (all integers little-endian)::

    MAGIC (b"stagepool-journal\\n", 18 bytes)
    record*:  u32 length | u32 crc32(payload) | payload (length bytes, length >= 1)

    payload of the first record: pickle of the header, a dict
        {"format": 1, "function": describe_callable(fn), "keys": how items are keyed}
    payload of every other record: pickle (protocol 5) of (key, kind, sides, body)
        key    the item's key: the user's ``key=`` value, or (input index, content digest)
        kind   the outcome's kind ("ok", "error", "timeout", "crash", "serialization")
        sides  names of the side files holding the body's out-of-band buffers, in order
        body   pickle (protocol 5) of Entry (value, error, traceback, duration, worker,
               attempts); buffers of SIDE_FILE_BYTES and more are out-of-band, in side files

A key recorded twice (an item run again, say because errors did not count as finished) counts
by its last record.

Crash safety. A side file is written to ``.tmp``, fsynced and renamed before the record naming
it is written. Records are handed to the kernel (``os.write``) as each chunk's results arrive, so
a ``kill -9`` of the caller loses only items still in flight; they reach the disk (``fsync``) in
groups, every FSYNC_RECORDS records or FSYNC_SECONDS, and at the end, so a power cut loses at
most that much. On open, a torn last record (cut short, or zeros where the file system had not
written it yet) is detected by its length and checksum and cut off, and side files no record
names are deleted. A bad record followed by good data is corruption, not a tear: refused.

One run at a time: the journal is locked (``flock``) while a batch uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import struct
import time
import uuid
import weakref
import zlib
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ._errors import CheckpointError
from ._outcome import Kind

__all__ = ["Entry", "Journal", "Mismatch", "check_checkpoint"]

MAGIC = b"stagepool-journal\n"
FORMAT = 1
JOURNAL_NAME = "journal.spj"
SIDE_DIR = "side"
_FRAME = struct.Struct("<II")
# Buffers from this size on go to side files: the journal stays small enough to read whole at
# open, and a big array is written once, not copied into a record.
SIDE_FILE_BYTES = 1 << 20
# Group commit. fsync costs a few ms on a disk (far more on a busy one); a chunk's results are
# in the kernel's page cache at once (safe from a killed process), and on disk within this bound
# (what a power cut may lose).
FSYNC_RECORDS = 1000
FSYNC_SECONDS = 1.0

Mismatch = Literal["refuse", "restart", "reuse"]
_log = logging.getLogger("stagepool")


class Entry(NamedTuple):
    """What a journal keeps of one finished item (its kind and key are in the record)."""

    value: Any
    error: Exception | None
    traceback: str | None
    duration: float
    worker: int | None
    attempts: int


class _Stored(NamedTuple):
    kind: Kind
    sides: tuple[str, ...]
    body: bytes


def check_checkpoint(directory: Path, header: dict[str, Any], mismatch: Mismatch) -> None:
    """At call time: the directory can be written, and its journal (if any) is this call's.

    Raises :class:`CheckpointError` naming the path and the cause (the OSError as ``__cause__``)."""
    _writable(directory)
    path = directory / JOURNAL_NAME
    if mismatch == "refuse" and path.exists():
        with open(path, "rb") as f:
            found = _binding_header(f, path)
        if found is not None:
            _compare(found, header, path)


def _writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SIDE_DIR).mkdir(exist_ok=True)
        probe = directory / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint={str(directory)!r} is not a writable directory: "
            f"{type(exc).__name__}: {exc}; give a directory this process can create files in"
        ) from exc


def _read_header(f: Any, path: Path) -> dict[str, Any] | None:
    """The journal's header, or None for an empty or torn-at-birth journal."""
    magic = f.read(len(MAGIC))
    if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
        return None
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a stagepool journal (its first bytes are "
                              f"{magic[:18]!r}); give checkpoint= a directory of its own")
    payload = _next_record(f)
    if payload is None:
        f.seek(len(MAGIC))
        if not _is_torn(f.read()):
            raise CheckpointError(f"checkpoint {path} is corrupt: its header record is bad and "
                                  "records follow; move it away to start over")
        return None  # the first run died while writing the header: nothing was journaled
    return dict(pickle.loads(payload))


def _binding_header(f: Any, path: Path) -> dict[str, Any] | None:
    """The header of a journal that holds something after it. One that holds nothing binds no
    call: it may be that of a call refused at the door (say, by a key= that raised)."""
    found = _read_header(f, path)
    return None if found is None or f.tell() >= os.fstat(f.fileno()).st_size else found


def _next_record(f: Any) -> bytes | None:
    """The next record's payload, or None if the rest of the file is not one whole record."""
    frame = f.read(_FRAME.size)
    if len(frame) < _FRAME.size:
        return None
    length, crc = _FRAME.unpack(frame)
    payload = f.read(length)
    if length == 0 or len(payload) < length or zlib.crc32(payload) != crc:
        return None
    return bytes(payload)


def _compare(found: dict[str, Any], header: dict[str, Any], path: Path) -> None:
    for field in ("function", "keys"):
        if found.get(field) != header[field]:
            raise CheckpointError(
                f"checkpoint {path} was written for {field} {found.get(field)!r}, and this call "
                f"has {header[field]!r}: its results may not be this call's. Pass "
                "checkpoint_mismatch='restart' to discard it and start over, or 'reuse' to take "
                "its finished items anyway (only if the results are unchanged), or use another "
                "directory")


class Journal:
    """One batch's open checkpoint: what earlier runs finished, and an appender for this run.

    Failure handling: errors while opening raise :class:`CheckpointError`; a write that fails
    during the batch (disk full) is logged once as a warning and journaling stops, the batch goes
    on (its report is complete; only the resumability of the rest is lost)."""

    def __init__(self, directory: Path, header: dict[str, Any], mismatch: Mismatch) -> None:
        _writable(directory)
        self.path = directory / JOURNAL_NAME
        self.sides = directory / SIDE_DIR
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._closer = weakref.finalize(self, os.close, self.fd)
        self.done: dict[Hashable, _Stored] = {}
        self.pending = 0
        self.synced = time.monotonic()
        self.broken = False
        try:
            self._lock()
            self._load(header, mismatch)
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"checkpoint {self.path} is in use by another running batch; wait for it to "
                "finish or use another directory") from None

    # ---- opening ----------------------------------------------------------------------------

    def _load(self, header: dict[str, Any], mismatch: Mismatch) -> None:
        with os.fdopen(os.dup(self.fd), "rb") as f:
            found = _binding_header(f, self.path)
            if found is not None and mismatch == "refuse":
                _compare(found, header, self.path)
            if found is None or mismatch == "restart":
                self._start(header)
                return
            end = self._read_records(f)
        os.ftruncate(self.fd, end)  # a torn tail is cut off, so appends follow good data
        os.lseek(self.fd, end, os.SEEK_SET)
        self._drop_orphans()

    def _start(self, header: dict[str, Any]) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        for side in self.sides.iterdir():
            side.unlink()
        os.write(self.fd, MAGIC + _frame(pickle.dumps({"format": FORMAT, **header})))
        self.sync()

    def _read_records(self, f: Any) -> int:
        """Index every whole record; return where the good data ends."""
        size = os.fstat(f.fileno()).st_size
        while True:
            end: int = f.tell()
            payload = _next_record(f)
            if payload is None:
                break
            key, kind, sides, body = pickle.loads(payload)
            self.done[key] = _Stored(kind, tuple(sides), body)
        f.seek(end)
        rest = f.read()
        if rest and not _is_torn(rest):
            raise CheckpointError(
                f"checkpoint {self.path} is corrupt at byte {end} of {size} (a bad record with "
                "data after it, not a write cut short by a crash); move it away to start over")
        if rest:
            _log.info("stagepool: checkpoint %s: dropped a torn last record (%d bytes)",
                      self.path, len(rest))
        return end

    def _drop_orphans(self) -> None:
        """Side files of records that never made it (the run died between the two writes)."""
        named = {name for stored in self.done.values() for name in stored.sides}
        for side in self.sides.iterdir():
            if side.name not in named:
                side.unlink()

    # ---- reading -----------------------------------------------------------------------------

    def finished(self, key: Hashable, kinds: frozenset[str]) -> tuple[Kind, Entry] | None:
        """The item's journaled outcome if its kind counts as finished, else None.

        A record that cannot be read back (its side file deleted or cut short, a value whose
        class is gone) is logged as a warning and counts as not finished: the item runs again,
        the rest of the checkpoint still serves."""
        stored = self.done.get(key)
        if stored is None or stored.kind not in kinds:
            return None
        try:
            buffers = [self._side(name) for name in stored.sides]
            return stored.kind, Entry(*pickle.loads(stored.body, buffers=buffers))
        except Exception as exc:
            _log.warning("stagepool: checkpoint %s: the record of item %r cannot be read back "
                         "(side files %s): %s: %s; the item runs again", self.path, key,
                         ", ".join(stored.sides) or "none", type(exc).__name__, exc)
            return None

    def _side(self, name: str) -> bytearray:
        path = self.sides / name
        data = bytearray(path.stat().st_size)  # writable: arrays come back as the caller's own
        with open(path, "rb") as f:
            f.readinto(data)
        return data

    # ---- appending ---------------------------------------------------------------------------

    def append(self, records: list[tuple[Hashable, Kind, Entry]]) -> None:
        """Journal finished items (one write); a value that will not pickle is left out (the
        item runs again next time)."""
        if self.broken or not records:
            return
        try:
            data = b"".join(filter(None, (self._record(*r) for r in records)))
            os.write(self.fd, data)
            self.pending += len(records)
            if self.pending >= FSYNC_RECORDS or time.monotonic() - self.synced >= FSYNC_SECONDS:
                self.sync()
        except OSError as exc:
            self.broken = True
            _log.warning("stagepool: checkpoint %s: writing failed (%s: %s); the batch goes on "
                         "without journaling", self.path, type(exc).__name__, exc)

    def _record(self, key: Hashable, kind: Kind, entry: Entry) -> bytes | None:
        big: list[pickle.PickleBuffer] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            if buffer.raw().nbytes < SIDE_FILE_BYTES:
                return True  # in-band: small buffers stay in the record
            big.append(buffer)
            return False

        try:
            body = pickle.dumps(entry, protocol=5, buffer_callback=out_of_band)
            sides = tuple(self._write_side(buffer) for buffer in big)
            return _frame(pickle.dumps((key, kind, sides, body), protocol=5))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            _log.debug("stagepool: checkpoint: an outcome would not pickle (%s), not kept", exc)
            return None

    def _write_side(self, buffer: pickle.PickleBuffer) -> str:
        name = f"{uuid.uuid4().hex}.buf"
        tmp = self.sides / f"{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(buffer.raw())
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(self.sides / name)
        return name

    def sync(self) -> None:
        """Put what was written on disk: the side directory's renames, then the journal."""
        dir_fd = os.open(self.sides, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        os.fsync(self.fd)
        self.pending, self.synced = 0, time.monotonic()

    def close(self) -> None:
        """Sync and release the lock (idempotent)."""
        if self._closer.alive:
            with contextlib.suppress(OSError):
                if not self.broken:
                    self.sync()
            self._closer()


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _is_torn(rest: bytes) -> bool:
    """Whether the bytes after the last good record are one write cut short: nothing but zeros
    (space the file system allocated and never wrote) after the bad record's claimed end."""
    if len(rest) < _FRAME.size:
        return True
    length: int = _FRAME.unpack_from(rest)[0]
    # A damaged length field also claims an end past the file's: the whole records after it
    # (which a write cut short never has) say it is corruption, not a tear.
    return not rest[_FRAME.size + length:].strip(b"\0") and not _holds_a_record(rest, 1)


def _holds_a_record(data: bytes, start: int) -> bool:
    """Whether a whole, checksummed record begins at any offset from ``start`` (only a journal's
    bad tail is searched, once, when it is opened)."""
    view = memoryview(data)
    for offset in range(start, len(data) - _FRAME.size):
        length, crc = _FRAME.unpack_from(data, offset)
        body = offset + _FRAME.size
        if 1 <= length <= len(data) - body and zlib.crc32(view[body:body + length]) == crc:
            return True
    return False
