"""``python -m tasksieve ...`` = the ``tasksieve`` command."""

import sys

from .cli import main

sys.exit(main())
