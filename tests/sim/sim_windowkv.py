"""Simulator cases for the WindowKV ops: each function takes the op's own arguments and builds the
runner case (csrc/sim/sim_windowkv.cu), doing what the CUDA glue (csrc/cuda/kv_window.cu) does
before its launch: kv_start and idx made contiguous, k handed over in its own layout ([B, N, Hk,
D], or an HF cache [B, Hk, N, D] seen through transpose(1, 2): the runner passes those strides
as the glue would; q is made contiguous), every kv entry as storage + strides (not a contiguous
copy), the default scale left to the launcher's helper. Argument checks stay with the glue: hand over only
inputs the CPU op accepts.

gather_windows / gather_windows_: the kv list travels as ``num_kv`` entries; entry i is a view
(``kv{i}_off``, ``kv{i}_sb/_sh/_sn`` element strides, ``kv{i}_d``) into the buffer tensor
``kv{j}``, j = ``kv{i}_buf``; entries that are views of one storage share one buffer, so
overlapping or interleaved views reach the kernel as they would on a card. The in-place op
returns those buffers; ``inplace_views(kv, outputs)`` turns them back into the entries.
"""

from __future__ import annotations

import torch

from .gpusim import Case, register

FAMILY = "windowkv"


@register(FAMILY, "window_scores")
def window_scores(q_obs, k, window, reduce="max", scale=None, kv_start=None) -> Case:
    B, N, Hk, D = k.shape
    # an HF cache [B, Hk, N, D] viewed as [B, N, Hk, D]: the glue passes its strides through
    bhnd = k.dim() == 4 and k.transpose(1, 2).is_contiguous() and not k.is_contiguous()
    return Case("window_scores", {
        "q_obs": q_obs.contiguous(),  # the runner assumes q contiguous (strides free in the glue)
        "k": k.transpose(1, 2) if bhnd else k.contiguous(),
        "k_bhnd": bool(bhnd),
        "window": int(window),
        "reduce": reduce,
        "scale": None if scale is None else float(scale),
        "kv_start": kv_start,
    })


@register(FAMILY, "select_windows")
def select_windows(scores, keep, share=False) -> Case:
    return Case("select_windows", {"scores": scores, "keep": int(keep), "share": bool(share)})


def _kv_args(kv) -> tuple[dict, list[tuple[int, int]]]:
    """Buffers and view descriptions of the kv list; also (owner, base element offset) per
    storage, in the order the runner returns in-place buffers."""
    args: dict = {"num_kv": len(kv)}
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(kv):
        groups.setdefault(t.untyped_storage().data_ptr(), []).append(i)
    owners = []
    for members in groups.values():
        lo = min(kv[i].storage_offset() for i in members)
        hi = max(kv[i].storage_offset() + sum((s - 1) * st for s, st in zip(kv[i].shape,
                                                                            kv[i].stride())) + 1
                 for i in members)
        owner = members[0]
        t0 = kv[owner]
        flat = torch.empty(0, dtype=t0.dtype).set_(t0.untyped_storage())
        args[f"kv{owner}"] = flat[lo:max(hi, lo)].clone()
        owners.append((owner, lo))
        for i in members:
            t = kv[i]
            args.update({f"kv{i}_buf": owner, f"kv{i}_off": t.storage_offset() - lo,
                         f"kv{i}_sb": t.stride(0), f"kv{i}_sh": t.stride(1),
                         f"kv{i}_sn": t.stride(2), f"kv{i}_d": t.shape[3]})
    return args, owners


def _gather_case(op, kv, idx, window, tail) -> Case:
    args, _ = _kv_args(list(kv))
    B, Hk, N = kv[0].shape[:3]
    args.update({"idx": idx.contiguous(), "B": B, "Hk": Hk, "N": N, "window": int(window),
                 "tail": int(tail)})
    return Case(op, args)


@register(FAMILY, "gather_windows")
def gather_windows(kv, idx, window, tail) -> Case:
    return _gather_case("gather_windows", kv, idx, window, tail)


@register(FAMILY, "gather_windows_")
def gather_windows_(kv, idx, window, tail) -> Case:
    return _gather_case("gather_windows_", kv, idx, window, tail)


def inplace_views(kv, outputs) -> list[torch.Tensor]:
    """The entries of ``kv`` after the simulated in-place gather, from the returned buffers."""
    _, owners = _kv_args(list(kv))
    lo_of = {owner: lo for owner, lo in owners}
    buf_of = {owner: buf for (owner, _), buf in zip(owners, outputs)}
    views = []
    groups: dict[int, int] = {}
    for i, t in enumerate(kv):
        owner = groups.setdefault(t.untyped_storage().data_ptr(), i)
        views.append(torch.as_strided(buf_of[owner], t.shape, t.stride(),
                                      t.storage_offset() - lo_of[owner]))
    return views
