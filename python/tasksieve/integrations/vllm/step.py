"""One engine step's split into dense and sparse requests, and its attention, with no vLLM import.

vLLM hands an attention backend every request of a step in one packed call: query rows of request r are
``query_start_loc[r] .. query_start_loc[r + 1]`` and its keys are the first ``seq_lens[r]`` positions (context
plus this step's tokens; the KV cache update has already written them). The metadata builder plans the step once
(:func:`plan_step`, host integers vLLM already holds on the host) and every layer runs the plan
(:func:`run_step`):

- decode tokens and short prefills (fewer than ``dense_below`` keys) -> the backend's own kernel, unchanged;
- fresh prefills (no cached context) -> :func:`flex_prefill_varlen` on the step's packed K/V, one launch;
- chunked-prefill continuations and prefix-cache hits -> the same on the paged cache, one launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ...methods.flexprefill import FlexPrefill
from ...methods.flexprefill_varlen import flex_prefill_varlen

__all__ = ["StepPlan", "plan_step", "run_step", "LayerStats"]

Rows = Union[slice, torch.Tensor]


@dataclass
class _Group:
    requests: list[int]
    q_lens: list[int]
    k_lens: list[int]
    rows: Rows
    cu_seqlens_q: torch.Tensor
    seq_lens_k: torch.Tensor
    block_table: Optional[torch.Tensor] = None


@dataclass
class StepPlan:
    """The split of one step (built once per step, read by every layer).

    Attributes
    ----------
    dense, fresh, continued : list[int]
        Request indices of each path (decode and short requests / sparse without context / sparse with context).
    dense_rows, fresh, continued groups
        Token rows (a slice when the rows are contiguous, else an int64 index tensor) and the device tensors each
        path's kernels take.
    dense_metadata : Any
        The backend's metadata restricted to the dense requests (set by the backend's builder).
    """

    num_tokens: int
    dense: list[int]
    dense_rows: Optional[Rows]
    fresh: Optional[_Group]
    continued: Optional[_Group]
    dense_metadata: Any = None

    @property
    def sparse(self) -> bool:
        return self.fresh is not None or self.continued is not None


def _rows(ranges: Sequence[tuple[int, int]], device) -> Rows:
    """A slice when the ranges are back to back, else the concatenated row indices."""
    if all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1)):
        return slice(ranges[0][0], ranges[-1][1])
    idx = torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in ranges])
    return idx.to(device, non_blocking=True)


def _offsets(lens: Sequence[int], device) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32).to(device, non_blocking=True)


def plan_step(query_start_loc: Sequence[int], seq_lens: Sequence[int], dense_below: int,
              block_table: Optional[torch.Tensor] = None, device: Union[str, torch.device] = "cpu") -> StepPlan:
    """Split a step's requests.

    Parameters
    ----------
    query_start_loc : sequence of int, [R + 1]
        Host offsets of each request's query rows.
    seq_lens : sequence of int, [R]
        Host key counts (context + this step's tokens).
    dense_below : int
        A request runs sparse iff it has more than one query token and at least this many keys.
    block_table : Tensor [R, max_pages] int32, optional
        The step's block table (its rows of continued requests are kept for the paged launch).
    device
        Where the kernels run (the offsets are copied there without a sync).
    """
    R = len(seq_lens)
    if len(query_start_loc) != R + 1:
        raise ValueError(f"plan_step: query_start_loc must have R + 1 = {R + 1} entries, got {len(query_start_loc)}")
    dense, fresh, cont = [], [], []
    for r in range(R):
        nq = query_start_loc[r + 1] - query_start_loc[r]
        nk = seq_lens[r]
        if nq > nk or nq < 0:
            raise ValueError(f"plan_step: request {r} has {nq} query tokens but {nk} keys")
        if nq <= 1 or nk < dense_below:
            dense.append(r)
        elif nq == nk:
            fresh.append(r)
        else:
            cont.append(r)

    def group(reqs: list[int], paged: bool) -> Optional[_Group]:
        if not reqs:
            return None
        q_lens = [query_start_loc[r + 1] - query_start_loc[r] for r in reqs]
        k_lens = [seq_lens[r] for r in reqs]
        rows = _rows([(query_start_loc[r], query_start_loc[r + 1]) for r in reqs], device)
        table = None
        if paged:
            if block_table is None:
                raise ValueError("plan_step: continued prefills need the step's block_table")
            table = block_table.index_select(0, torch.tensor(reqs, dtype=torch.int64).to(block_table.device))
        lens = torch.tensor(k_lens, dtype=torch.int32).to(device, non_blocking=True)
        return _Group(reqs, q_lens, k_lens, rows, _offsets(q_lens, device), lens, table)

    dense_rows = None
    if dense:
        nonempty = [(query_start_loc[r], query_start_loc[r + 1]) for r in dense
                    if query_start_loc[r + 1] > query_start_loc[r]]
        dense_rows = _rows(nonempty, device) if nonempty else slice(0, 0)
    return StepPlan(query_start_loc[R], dense, dense_rows, group(fresh, False), group(cont, True))


@dataclass
class LayerStats:
    """What one attention layer did, summed over steps (readable from the workers; see ``tasksieve.vllm.stats``).

    Host counters are plain ints. ``computed_blocks`` accumulates on the device so the hot path never syncs; it is
    read (one sync) only when somebody asks.
    """

    steps: int = 0
    sparse_steps: int = 0
    dense_requests: int = 0
    sparse_requests: int = 0
    paged_requests: int = 0
    causal_blocks: int = 0
    query_aware_heads: Optional[torch.Tensor] = None
    sparse_heads: int = 0
    computed_blocks: Optional[torch.Tensor] = field(default=None)

    def add(self, report, requests: int) -> None:
        self.sparse_requests += requests
        self.causal_blocks += report.causal_blocks
        qa = report.is_query_aware.sum(dtype=torch.int64)
        self.sparse_heads += report.is_query_aware.numel()
        if self.computed_blocks is None:
            self.computed_blocks = report.computed_blocks.clone()
            self.query_aware_heads = qa
        else:
            self.computed_blocks += report.computed_blocks
            self.query_aware_heads += qa

    def as_dict(self) -> dict:
        computed = 0 if self.computed_blocks is None else int(self.computed_blocks)
        qa = 0 if self.query_aware_heads is None else int(self.query_aware_heads)
        return {"steps": self.steps, "sparse_steps": self.sparse_steps, "dense_requests": self.dense_requests,
                "sparse_requests": self.sparse_requests, "paged_requests": self.paged_requests,
                "computed_blocks": computed, "causal_blocks": self.causal_blocks,
                "query_aware_heads": qa, "sparse_heads": self.sparse_heads}


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _put(out: torch.Tensor, rows: Rows, value: torch.Tensor) -> None:
    if isinstance(rows, slice):
        out[rows] = value
    else:
        out.index_copy_(0, rows, value)


def run_step(plan: StepPlan, settings: FlexPrefill, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, output: torch.Tensor, scale: float,
             dense_forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any], None],
             stats: Optional[LayerStats] = None) -> torch.Tensor:
    """One layer of a planned step.

    Parameters
    ----------
    query : Tensor [T, H, D]; key, value : Tensor [T, Hk, D]
        The step's packed tokens (rows past ``plan.num_tokens`` are padding and left alone).
    k_cache, v_cache : Tensor [num_pages, page_size, Hk, D]
        Views of this layer's paged cache, already holding this step's keys and values.
    output : Tensor [T, H, D]
        Written in place: every planned row.
    dense_forward : callable(query, key, value, output, metadata)
        The backend's own attention on the dense requests' rows with ``plan.dense_metadata``.
    """
    if stats is not None:
        stats.steps += 1
        stats.dense_requests += len(plan.dense)
        stats.sparse_steps += int(plan.sparse)
    if plan.dense and plan.dense_rows is not None:
        rows = plan.dense_rows
        q_d = _take(query, rows)
        if q_d.shape[0]:
            out_d = output.new_empty((q_d.shape[0],) + tuple(output.shape[1:]))
            dense_forward(q_d, _take(key, rows), _take(value, rows), out_d, plan.dense_metadata)
            _put(output, rows, out_d)
    if plan.fresh is not None:
        g = plan.fresh
        out, report = flex_prefill_varlen(_take(query, g.rows), g.q_lens, g.k_lens, settings, k=_take(key, g.rows),
                                          v=_take(value, g.rows), cu_seqlens_q=g.cu_seqlens_q, scale=scale)
        _put(output, g.rows, out.to(output.dtype))
        if stats is not None:
            stats.add(report, len(g.requests))
    if plan.continued is not None:
        g = plan.continued
        out, report = flex_prefill_varlen(_take(query, g.rows), g.q_lens, g.k_lens, settings, k_cache=k_cache,
                                          v_cache=v_cache, block_table=g.block_table, seq_lens_k=g.seq_lens_k,
                                          cu_seqlens_q=g.cu_seqlens_q, scale=scale)
        _put(output, g.rows, out.to(output.dtype))
        if stats is not None:
            stats.add(report, len(g.requests))
            stats.paged_requests += len(g.requests)
    return output
