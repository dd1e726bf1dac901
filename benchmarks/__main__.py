"""``python -m benchmarks``: see cli.py."""

import sys

from .cli import main

if __name__ == "__main__":  # spawn children re-import this module as __mp_main__: do nothing then
    sys.exit(main())
