"""vLLM's FlashAttention backend (``FLASH_ATTN``) with FlexPrefill sparse prefill, on CUDA.

The CUDA twin of :mod:`tasksieve.integrations.vllm.cpu`: same plan, same ops, the cache read through the
``"kv_concat"`` view vLLM 0.32's FlashAttention itself takes (logical ``[pages, Hk, page, 2 * D]``). Host lengths
come from the metadata vLLM already keeps on the host (``query_start_loc_cpu``, ``seq_lens_cpu_upper_bound``,
exact for prefill rows), so planning adds no device sync; the dense requests' metadata reuses the device tensors
with the rows of those requests. Decode-only steps (CUDA graphs) take the parent path untouched. Written for
the GPU validation run: it cannot run on the project's CPU machines.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadataBuilder)

from ...ops.paged import paged_kv_views
from .config import read_config
from .step import LayerStats, plan_step, run_step
from .support import check_layer

__all__ = ["TasksieveFlashAttentionBackend"]


class TasksieveFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tasksieve = read_config()

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        if self.tasksieve is None or md.causal is not True or cm.max_query_len <= 1:
            return md  # decode-only steps stay exactly vLLM's (and CUDA-graph friendly)
        R = cm.num_reqs
        if cm.seq_lens_cpu_upper_bound is None:
            return md  # no host lengths: planning would need a sync, so this step stays dense
        qsl = cm.query_start_loc_cpu[:R + 1].tolist()
        lens = cm.seq_lens_cpu_upper_bound[:R].tolist()
        plan = plan_step(qsl, lens, self.tasksieve.dense_threshold, md.block_table, md.query_start_loc.device)
        if plan.sparse and plan.dense:
            plan.dense_metadata = self._dense_metadata(md, qsl, lens, plan.dense)
        md.tasksieve_plan = plan
        return md

    @staticmethod
    def _dense_metadata(md, qsl, seq_lens, dense):
        q_lens = [qsl[r + 1] - qsl[r] for r in dense]
        offsets = [0]
        for n in q_lens:
            offsets.append(offsets[-1] + n)
        device = md.query_start_loc.device
        rows = torch.tensor(dense, dtype=torch.int64).to(device, non_blocking=True)
        return dataclasses.replace(
            md, num_actual_tokens=offsets[-1], max_query_len=max(q_lens),
            query_start_loc=torch.tensor(offsets, dtype=md.query_start_loc.dtype).to(device, non_blocking=True),
            max_seq_len=max(seq_lens[r] for r in dense), seq_lens=md.seq_lens.index_select(0, rows),
            block_table=md.block_table.index_select(0, rows), scheduler_metadata=None, max_num_splits=0,
            mm_prefix_query_range_tensor=None)


class TasksieveFlashAttentionImpl(FlashAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tasksieve = read_config()
        self.tasksieve_stats = LayerStats()
        if self.tasksieve is not None:
            from vllm.config import get_current_vllm_config

            check_layer(self, device="cuda", dtype=get_current_vllm_config().model_config.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        plan = getattr(attn_metadata, "tasksieve_plan", None)
        if plan is None or not plan.sparse or output_scale is not None or output_block_scale is not None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        k_cache, v_cache = paged_kv_views(kv_cache, "kv_concat", kv_cache.shape[2], self.num_kv_heads,
                                          self.head_size)

        def dense_forward(q, k, v, out, metadata):
            FlashAttentionImpl.forward(self, layer, q, k, v, kv_cache, metadata, out)

        return run_step(plan, self.tasksieve, query, key, value, k_cache, v_cache, output, self.scale,
                        dense_forward, self.tasksieve_stats)


class TasksieveFlashAttentionBackend(FlashAttentionBackend):
    """``FLASH_ATTN`` with FlexPrefill prefill (same name, cache layout and kernel sizes as vLLM's)."""

    @staticmethod
    def get_impl_cls():
        return TasksieveFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return TasksieveFlashAttentionMetadataBuilder
