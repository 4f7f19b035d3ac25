"""`python -m tinyswin` is the `tinyswin` command."""

import sys

from tinyswin.cli import main

if __name__ == "__main__":
    sys.exit(main())
