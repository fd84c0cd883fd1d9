"""``python -m ream_modifiers.cli`` (what ``torchrun -m`` runs)."""

import sys

from ream_modifiers.cli import main

sys.exit(main())
