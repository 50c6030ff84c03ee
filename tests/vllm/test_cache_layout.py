"""tasksieve's "cpu_attn" view is what vLLM's CPU kernels actually write: keys and values stored through
vLLM's own cpu_attn_reshape_and_cache (every ISA the plugin accepts) read back equal through paged_kv_views."""

import importlib.util

import pytest
import torch

# No conftest here: a second conftest.py would replace the suite's own `conftest` module. vLLM's CPU engine only
# (on a GPU machine bench/vllm_device_check.py checks the plugin), and only where vLLM is really installed: without
# it, this folder itself would import as a namespace package named "vllm".
_VLLM = importlib.util.find_spec("vllm")
if _VLLM is None or _VLLM.origin is None or torch.cuda.is_available():
    pytest.skip("needs vLLM's CPU engine (make test-vllm)", allow_module_level=True)

from tasksieve.ops import paged_kv_views


@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 32), (torch.float32, 80), (torch.bfloat16, 64)])
def test_cpu_attn_view_reads_what_vllm_writes(dtype, head_dim):
    from vllm import _custom_ops as vllm_ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from tasksieve.integrations.vllm.cpu import _READABLE_ISAS

    pages, Hk, P, T = 5, 2, 32, 70
    isa = _get_attn_isa(dtype, P, head_dim, "auto")
    if isa not in _READABLE_ISAS:
        pytest.skip(f"this CPU picks vLLM's {isa!r} kernels (the plugin refuses them at engine start)")
    cache = torch.zeros(pages, Hk, P, 2 * head_dim, dtype=dtype)
    k_half, v_half = cache.view(pages, Hk, 2 * P, head_dim).chunk(2, dim=2)
    g = torch.Generator().manual_seed(0)
    key = torch.randn(T, Hk, head_dim, generator=g).to(dtype)
    value = torch.randn(T, Hk, head_dim, generator=g).to(dtype)
    page_of = [3, 0, 4]  # token t -> page page_of[t // P], row t % P
    slots = torch.tensor([page_of[t // P] * P + t % P for t in range(T)], dtype=torch.int64)
    vllm_ops.cpu_attn_reshape_and_cache(key, value, k_half, v_half, slots, isa, k_scale=1.0, v_scale=1.0,
                                        kv_cache_dtype="auto")
    k_view, v_view = paged_kv_views(cache, "cpu_attn", P, Hk, head_dim)
    for t in range(T):
        assert torch.equal(k_view[page_of[t // P], t % P], key[t]), t
        assert torch.equal(v_view[page_of[t // P], t % P], value[t]), t
