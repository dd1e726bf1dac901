"""Profile a stage from a checkout, without installing stagepool: ``stagepool profile`` by another door.

    python tools/profile_stage.py MODULE:FUNCTION --items MODULE:FACTORY [--sample N] [--out DIR]
                                  [--mem-limit SIZE] [--max-workers N] [--run-seconds S]
    python tools/profile_stage.py --demo

It runs the stage serially on the sample, then through the engine across worker counts and chunk
sizes, prints a table and the recommended ``Engine`` settings (each with its reason), and with
``--out`` writes ``profile.json`` (load it with ``stagepool.load_profile`` or
``Engine.from_profile``), ``measurements.json`` and PNG plots. Exit status 2 for a bad target.
"""

from __future__ import annotations

import sys
from pathlib import Path

# From a checkout: use the source tree next to this file when stagepool is not installed.
_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from stagepool.cli import main  # noqa: E402  (after the path set-up above)

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
