"""``python -m stagepool`` is the ``stagepool`` command."""

import sys

from .cli import main

sys.exit(main())
