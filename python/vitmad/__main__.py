"""``python -m vitmad``: the ``vitmad`` command line (also what ``torchrun -m vitmad`` runs)."""

import sys

from .cli import main

sys.exit(main())
