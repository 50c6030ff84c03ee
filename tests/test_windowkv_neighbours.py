"""WindowKV's neighbour rule (``neighbours="right"|"both"``): the window scores a selection ranks, against a plain
per-element loop that shares no code with ``neighbour_scores``, and the press end to end against the op references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tasksieve import reference as ref
from tasksieve.methods.windowkv import WindowKV, neighbour_scores


def loop_neighbours(scores, side, weight, window=1, kv_start=None):
    """out[b, h, i] = max over {s[i], weight * s[i-1] (+ weight * s[i+1] for 'both')}, NaN ignored unless all NaN;
    windows ending at or before kv_start[b] keep s[i]."""
    B, Hk, nw = scores.shape
    out = scores.clone()
    for b in range(B):
        for h in range(Hk):
            for i in range(nw):
                if side == "none":
                    continue
                if kv_start is not None and (i + 1) * window <= int(kv_start[b]):
                    continue
                cand = [float(scores[b, h, i])]
                if i > 0:
                    cand.append(weight * float(scores[b, h, i - 1]))
                if side == "both" and i + 1 < nw:
                    cand.append(weight * float(scores[b, h, i + 1]))
                real = [c for c in cand if not math.isnan(c)]
                out[b, h, i] = max(real) if real else float("nan")
    return out


@given(
    B=st.integers(1, 3), Hk=st.integers(1, 3), nw=st.integers(0, 12),
    side=st.sampled_from(["none", "right", "both"]), weight=st.sampled_from([0.25, 0.5, 1.0]),
    window=st.integers(1, 8), pad=st.booleans(), nan=st.booleans(), seed=st.integers(0, 2**16),
)
def test_neighbour_scores_matches_loop(B, Hk, nw, side, weight, window, pad, nan, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, Hk, nw, generator=g)
    if nan and nw:
        s[0, 0, int(torch.randint(nw, (1,), generator=g))] = float("nan")
    kv_start = torch.randint(0, nw * window + 1, (B,), generator=g, dtype=torch.int32) if pad else None
    got = neighbour_scores(s, side, weight, window, kv_start)
    want = loop_neighbours(s, side, weight, window, kv_start)
    assert got.shape == s.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_neighbour_scores_hand_made():
    s = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 4.0, 0.0]]])
    assert neighbour_scores(s, "right", 0.5).tolist() == [[[0.0, 1.0, 0.5, 0.0, 4.0, 2.0]]]
    assert neighbour_scores(s, "both", 0.5).tolist() == [[[0.5, 1.0, 0.5, 2.0, 4.0, 2.0]]]
    # windows 0 and 1 (tokens 0..3 with window 2) are padding: they keep their own score
    assert neighbour_scores(s, "both", 0.5, 2, torch.tensor([4])).tolist() == [[[0.0, 1.0, 0.5, 2.0, 4.0, 2.0]]]
    with pytest.raises(ValueError, match="side"):
        neighbour_scores(s, "left", 0.5)


@pytest.mark.parametrize("side", ["right", "both"])
@pytest.mark.parametrize("group_scoring", ["mean", "first"])
def test_windowkv_neighbours_matches_reference_pipeline(side, group_scoring):
    """Scores from the op reference, the loop rule, the select and gather references; budget unchanged."""
    torch.manual_seed(5)
    B, N, H, Hk, D, L = 2, 170, 4, 2, 16, 2
    press = WindowKV(budget=40, window=8, group=2, strategy="mean", schedule="uniform", neighbours=side,
                     neighbour_weight=0.5, group_scoring=group_scoring)
    plain = WindowKV(budget=40, window=8, group=2, strategy="mean", schedule="uniform", group_scoring=group_scoring)
    qs = [torch.randn(B, 16, H, D) for _ in range(L)]
    ks = [torch.randn(B, Hk, N, D) for _ in range(L)]
    vs = [torch.randn(B, Hk, N, D) for _ in range(L)]
    st_n, st_p = press.new_state(L), plain.new_state(L)
    out, out_plain = {}, {}
    for i in range(L):
        out.update(press.compress_layers(i, ks[i], vs[i], qs[i], st_n))
        out_plain.update(plain.compress_layers(i, ks[i], vs[i], qs[i], st_p))
    nw = (N - 16) // 8
    tail = N - nw * 8
    layers = [0] if group_scoring == "first" else [0, 1]
    s = sum(ref.reference_window_scores(qs[i], ks[i].transpose(1, 2), 8, "mean") for i in layers) / len(layers)
    idx = ref.reference_select_windows(loop_neighbours(s, side, 0.5), 5, share=True)
    for i in range(L):
        ek, ev = ref.reference_gather_windows([ks[i], vs[i]], idx, 8, tail)
        torch.testing.assert_close(out[i][0], ek, rtol=0, atol=0)
        torch.testing.assert_close(out[i][1], ev, rtol=0, atol=0)
        assert out[i][0].shape == out_plain[i][0].shape == (B, Hk, 5 * 8 + tail, D)  # same kept-token count
    assert st_n.kept == st_p.kept


def test_windowkv_neighbours_keeps_the_cut_tail():
    """A key run that straddles a window boundary, attended only on its head: 'none' drops the tail window,
    the neighbour rule keeps it within the same number of windows ("both" also gives the left neighbour a share,
    which wins the tie to the lower index, so it gets one window more)."""
    torch.manual_seed(0)
    Hk, H, D, N, A, w = 1, 1, 32, 8 * 20 + 8, 8, 8
    q = torch.randn(1, A, H, D)
    k = torch.randn(1, Hk, N, D) * 0.01
    qd = q[0, :, 0].mean(0)
    k[0, 0, 8 * 9 + 6 : 8 * 9 + 8] = 8.0 * qd / qd.norm()  # the head of the run: last 2 tokens of window 9
    k[0, 0, 8 * 3] = 6.0 * qd / qd.norm()  # a weaker distractor in window 3
    for side, budget in (("none", 16), ("right", 16), ("both", 24)):
        press = WindowKV(budget=budget, window=w, group=1, strategy="mean", obs_window=A, neighbours=side)
        st = press.new_state(1)
        press.compress_layer(0, k, k, q, st)
        kept = set(st.token_index[0, 0].tolist())
        assert 8 * 9 + 7 in kept
        assert (8 * 10 in kept) == (side != "none"), side  # window 10 continues the run


def test_windowkv_neighbours_validation():
    with pytest.raises(ValueError, match="neighbours"):
        WindowKV(neighbours="left")
    with pytest.raises(ValueError, match="neighbour_weight"):
        WindowKV(neighbours="both", neighbour_weight=0.0)
    with pytest.raises(ValueError, match="neighbour_weight"):
        WindowKV(neighbour_weight=1.5)


def test_hf_neighbours_full_budget_is_dense_and_budget_unchanged():
    """Through the HF integration on a tiny Llama: a full budget still equals dense, and at 30% the neighbour rule
    keeps exactly as many tokens per layer as the plain press (left-padded batch included)."""
    pytest.importorskip("transformers")
    from tasksieve import hf
    from tasksieve.evaluation import models

    model = models.tiny_model("llama", seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (1, 150), generator=g)
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dense = model.generate(ids, **gen)
        with hf.patched(model, kv=WindowKV(budget=1.0, window=8, group=2, neighbours="both")):
            assert torch.equal(model.generate(ids, **gen), dense)
        kept = {}
        batch = torch.randint(3, 128, (2, 150), generator=g)
        mask = torch.ones_like(batch)
        mask[1, :20] = 0
        for side in ("none", "right", "both"):
            with hf.patched(model, kv=WindowKV(budget=0.3, window=8, group=2, neighbours=side)):
                model.generate(batch, attention_mask=mask, **gen)
                kept[side] = hf.last_info(model)["kept_tokens"]
    assert kept["none"] == kept["right"] == kept["both"]
    assert max(kept["none"]) < 150
