"""tests/vllm runs vLLM's CPU engine inside .venv-vllm (``make test-vllm``). Skipped whole where vLLM is absent,
and on a GPU machine (vLLM would pick its CUDA backends there: bench/vllm_device_check.py is the GPU check)."""

import importlib.util

import torch

_RUN = importlib.util.find_spec("vllm") is not None and not torch.cuda.is_available()
collect_ignore_glob = [] if _RUN else ["test_*.py"]
