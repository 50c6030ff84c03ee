"""tests/ruler runs inside .venv-ruler (``make test-ruler``); anywhere without lm-eval it is skipped whole."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("lm_eval") else ["test_*.py"]
