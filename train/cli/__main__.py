"""`python -m train.cli …`: the same app as the `can` command (from a folder without its own `train.py`)."""

import sys

from train.cli import main

sys.exit(main())
