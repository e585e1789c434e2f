"""Split one inference batch across every device listed (see README.md)."""

import sys

from hetero.cli import inference

if __name__ == "__main__":
    sys.exit(inference())
