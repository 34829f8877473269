"""`python -m jaxserve`: the `jaxserve` command line, for an environment where the package
is importable but its console script is not installed."""

import sys

from jaxserve.cli import main

if __name__ == "__main__":
    sys.exit(main())
