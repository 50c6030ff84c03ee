"""tests/vllm runs inside .venv-vllm (``make test-vllm``); anywhere without vLLM it is skipped whole."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]
