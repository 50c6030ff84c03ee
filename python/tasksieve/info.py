"""``python -m tasksieve.info``: what was built (see :mod:`tasksieve.ops.info`)."""

import sys

from .ops.info import build_info, main

__all__ = ["build_info", "main"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
