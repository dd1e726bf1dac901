"""Reading a worker's stderr tail: faulthandler dumps, where a hung item was, the lines that matter.

Pure text functions (no processes, no imports beyond ``re``), shared by the local backend, which
cuts a hung item's stack out of its worker's stderr, and the failure messages, which must stay
short: a segfault's dump ends with an "Extension modules: ..." line of several KiB that has no
place in ``report.summary()``. The whole text stays on the exception as an attribute.

faulthandler (CPython 3.11) writes, for each thread, a header and the frames innermost first::

    Fatal Python error: Segmentation fault          (only for a fatal signal)

    Thread 0x00007f3b... (most recent call first):
      File "/app/stage.py", line 12 in decode
      ...

    Current thread 0x00007f3c... (most recent call first):
      File "/app/stage.py", line 40 in resample

    ("Stack (most recent call first):" instead when one thread is dumped)

    Extension modules: numpy._core..., av._core (total: 42)
"""

from __future__ import annotations

import re

__all__ = ["brief", "last_dump", "where"]

# "Stack" heads a dump of the current thread alone (faulthandler.enable(all_threads=False)).
_HEADER = re.compile(
    r"^(?:(?:Current thread|Thread) 0x[0-9a-fA-F]+|Stack) \(most recent call first\):$")
_FRAME = re.compile(r'^  File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.*)$')
_FATAL = "Fatal Python error"
_MODULES = "Extension modules:"
LINE_CHARS = 200  # a line longer than this is clipped in a message (the attribute keeps it whole)


def _frame_like(line: str) -> bool:
    return line.startswith("  ") or not line  # frames, "  ...", "  <no Python frame>", blanks


def last_dump(text: str) -> str:
    """The last faulthandler dump in ``text`` (every thread of it, and the "Fatal Python error"
    line before it when there is one); "" when there is none."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if _HEADER.match(line)]
    if not headers:
        return ""
    end = headers[-1] + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    first = headers[-1]
    for i in reversed(headers[:-1]):  # earlier threads of the same dump: only frames between
        if not all(_frame_like(line) for line in lines[i + 1 : first]):
            break
        first = i
    before = first - 1
    while before >= 0 and not lines[before]:
        before -= 1
    if before >= 0 and lines[before].startswith(_FATAL):
        first = before
    return "\n".join(lines[first:end]).strip("\n")


def _blocks(dump: str) -> list[list[str]]:
    blocks: list[list[str]] = []
    for line in dump.splitlines():
        if _HEADER.match(line):
            blocks.append([])
        elif blocks and _FRAME.match(line):
            blocks[-1].append(line)
    return blocks


def where(dump: str) -> str:
    """Where the main thread was: its innermost Python frame as "func (file:line)"; "" if the
    dump has none. The main thread is the last one faulthandler lists (it lists the newest
    thread first); a dump of one thread is that thread."""
    blocks = [block for block in _blocks(dump) if block]
    if not blocks:
        return ""
    match = _FRAME.match(blocks[-1][0])
    assert match is not None  # _blocks keeps frame lines only
    return f"{match['func']} ({match['file']}:{match['line']})"


def _clip(line: str) -> str:
    return line if len(line) <= LINE_CHARS else line[: LINE_CHARS - 3] + "..."


def brief(text: str, *, lines: int = 6) -> str:
    """A few lines of a stderr tail for a message: for a fatal error, the two lines before it,
    its first line and the innermost frames of the crashing thread; else the last ``lines``
    lines. Never the
    "Extension modules" list; long lines are clipped."""
    kept = [line for line in text.strip().splitlines() if not line.startswith(_MODULES)]
    dump = last_dump("\n".join(kept))
    if dump.startswith(_FATAL):  # what it said just before, the error, the innermost frames
        said = [line for line in kept[: kept.index(dump.splitlines()[0])] if line.strip()]
        frames = next((block for block in _blocks(dump) if block), [])
        kept = [*said[-2:], dump.splitlines()[0], *frames[: lines - 1]]
    else:
        kept = [line for line in kept if line.strip()][-lines:]
    return "\n".join(_clip(line) for line in kept)
