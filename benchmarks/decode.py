"""Decode benchmark (see sparsa.benchmarks.decode); same as `sparsa bench decode`."""

import sys

from sparsa.benchmarks.decode import main

if __name__ == "__main__":
    sys.exit(main())
