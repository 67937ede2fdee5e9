"""Normalizer benchmark (see sparsa.benchmarks.normalizers); same as `sparsa bench normalizers`."""

import sys

from sparsa.benchmarks.normalizers import main

if __name__ == "__main__":
    sys.exit(main())
