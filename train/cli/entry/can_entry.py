"""The `can` command as a script file, for accelerate's launcher (see this folder's `__init__`)."""

import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main())
