"""Attention benchmark (see sparsa.benchmarks.attention); same as `sparsa bench attention`."""

import sys

from sparsa.benchmarks.attention import main

if __name__ == "__main__":
    sys.exit(main())
