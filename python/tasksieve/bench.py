"""``python -m tasksieve.bench``: the benchmark harness (:mod:`tasksieve.evaluation.bench`)."""

import sys

from .evaluation.bench import main

if __name__ == "__main__":
    sys.exit(main())
