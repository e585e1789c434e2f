"""Print a hetero profile table."""

import sys

from hetero.cli import print_table

if __name__ == "__main__":
    sys.exit(print_table())
