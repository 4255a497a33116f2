"""``python -m lorafit``: the CLI (what ``torchrun -m lorafit`` starts in every process)."""

import sys

from .cli import main

sys.exit(main())
