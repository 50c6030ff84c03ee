"""vLLM's CPU attention backend (``CPU_ATTN``) with FlexPrefill sparse prefill.

Registered over ``CPU_ATTN`` by :func:`tasksieve.integrations.vllm.register` when ``TASKSIEVE_FLEXPREFILL`` is
set. The classes subclass vLLM's own (the metadata builder checks the impl's type): the builder plans each step
once (:func:`~tasksieve.integrations.vllm.step.plan_step`) and builds the metadata of the dense requests alone;
the impl sends those to vLLM's kernel unchanged and the sparse prefills to tasksieve's ops. The KV cache update
stays vLLM's.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm import _custom_ops as vllm_ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from ...ops.paged import paged_kv_views
from .config import ENV_VAR, read_config
from .step import LayerStats, plan_step, run_step
from .support import UnsupportedModelError, check_layer

# vLLM CPU kernels whose cache pages are the "cpu_attn" layout of tasksieve.ops.paged_kv_views (checked against
# vLLM 0.32's cpu_attn_reshape_and_cache in tests/vllm); AMX / NEON / VXE / VSX pack K differently.
_READABLE_ISAS = ("vec", "vec16")

__all__ = ["TasksieveCPUAttentionBackend"]


class TasksieveCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tasksieve = read_config()
        if self.tasksieve is not None and self.isa not in _READABLE_ISAS:
            raise UnsupportedModelError(
                f"{ENV_VAR} is set but vLLM's CPU attention picked its {self.isa!r} kernels, whose KV pages are "
                f"packed in a layout tasksieve does not read (it reads the {_READABLE_ISAS} pages: K transposed, "
                "V rows); serve in float32, or unset the variable")

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        if self.tasksieve is None or md.causal is not True or self.is_encoder_only_attention:
            return md
        R = cm.num_reqs
        qsl = cm.query_start_loc_cpu[:R + 1].tolist()
        lens = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens.cpu()
        plan = plan_step(qsl, lens[:R].tolist(), self.tasksieve.dense_threshold, md.block_table, md.query_start_loc.device)
        if plan.sparse and plan.dense:
            plan.dense_metadata = self._dense_metadata(md, qsl, lens[:R].tolist(), plan.dense)
        md.tasksieve_plan = plan
        return md

    def _dense_metadata(self, md, qsl, seq_lens, dense):
        """``md`` restricted to the dense requests, packed in their order (vLLM's scheduler metadata rebuilt)."""
        q_lens = [qsl[r + 1] - qsl[r] for r in dense]
        k_lens = [seq_lens[r] for r in dense]
        offsets = [0]
        for n in q_lens:
            offsets.append(offsets[-1] + n)
        query_start_loc = torch.tensor(offsets, dtype=md.query_start_loc.dtype)
        lens = torch.tensor(k_lens, dtype=md.seq_lens.dtype)
        table = md.block_table.index_select(0, torch.tensor(dense, dtype=torch.int64))
        scheduler_metadata = vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(dense), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            seq_lens=lens, dtype=self.dtype, query_start_loc=query_start_loc, causal=md.causal,
            sliding_window_size=self.window_size, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None, kv_cache_dtype=self.kv_cache_dtype)
        return dataclasses.replace(md, num_actual_tokens=offsets[-1], max_query_len=max(q_lens),
                                   query_start_loc=query_start_loc, max_seq_len=max(k_lens), seq_lens=lens,
                                   block_table=table, scheduler_metadata=scheduler_metadata)


class TasksieveCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tasksieve = read_config()
        self.tasksieve_stats = LayerStats()
        if self.tasksieve is not None:
            check_layer(self, device="cpu")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        plan = getattr(attn_metadata, "tasksieve_plan", None)
        if plan is None or not plan.sparse or output_scale is not None or output_block_scale is not None:
            if plan is not None:
                self.tasksieve_stats.steps += 1
                self.tasksieve_stats.dense_requests += len(plan.dense)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        page = kv_cache.shape[2]
        k_cache, v_cache = paged_kv_views(kv_cache, "cpu_attn", page, self.num_kv_heads, self.head_size)

        def dense_forward(q, k, v, out, metadata):
            CPUAttentionBackendImpl.forward(self, layer, q, k, v, kv_cache, metadata, out)

        return run_step(plan, self.tasksieve, query, key, value, k_cache, v_cache, output, self.scale,
                        dense_forward, self.tasksieve_stats)


class TasksieveCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with FlexPrefill prefill (same name, cache layout and kernel sizes as vLLM's)."""

    @staticmethod
    def get_impl_cls():
        return TasksieveCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TasksieveCPUMetadataBuilder
