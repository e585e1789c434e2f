"""Measure host-device copy time per batch size."""

import sys

from hetero.cli import measure_io

if __name__ == "__main__":
    sys.exit(measure_io())
