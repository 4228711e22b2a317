"""Attention FLOPs accounting: closed forms against the mask, tile counts against brute force, plan stats."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfa2_jax.plan.flops import (arrow_pairs, arrow_tiles, attention_flops, kept_fraction, kept_table, plan_stats,
                            total_tiles)
from tests.oracles import brute_force_mask
from pallas_kernels import arrow_mask
from dfa2_jax.models.configs import SD3Config
from dfa2_jax.plan import Plan, model_info_for


def _tiles_brute(mask: np.ndarray, bq: int, bk: int) -> int:
    s = mask.shape[0]
    return sum(bool(mask[i:i + bq, j:j + bk].any()) for i in range(0, s, bq) for j in range(0, s, bk))


@settings(max_examples=20, deadline=None)
@given(n_img=st.integers(0, 48), text=st.integers(0, 24), text_first=st.booleans(),
       ws=st.lists(st.integers(-1, 60), min_size=4, max_size=4))
def test_exact_pairs_equal_mask_sum(n_img, text, text_first, ws):
    s = n_img + text
    if s == 0:
        return
    masks = np.asarray(arrow_mask(s, text, text_first, np.array(ws)))  # [4, S, S], one call per shape
    assert [arrow_pairs(n_img, text, w) for w in ws] == masks.sum(axis=(1, 2)).tolist()


@settings(max_examples=150, deadline=None)
@given(n_img=st.integers(0, 40), text=st.integers(0, 20), w=st.integers(-1, 45), text_first=st.booleans(),
       bq=st.integers(1, 9), bk=st.integers(1, 9))
def test_tiles_equal_brute_force(n_img, text, w, text_first, bq, bk):
    s = n_img + text
    if s == 0:
        return
    mask = brute_force_mask(s, text, text_first, w)
    assert arrow_pairs(n_img, text, w) == mask.sum()
    assert arrow_tiles(n_img, text, text_first, w, (bq, bk)) == _tiles_brute(mask, bq, bk)


def test_tiles_kernel_blocks_larger_case():
    # a size with several 128 x 64 tiles, both orders, text not aligned to the blocks
    n, t = 700, 77
    for text_first in (False, True):
        mask = brute_force_mask(n + t, t, text_first, 50)
        assert arrow_tiles(n, t, text_first, 50) == _tiles_brute(mask, 128, 64)
    assert total_tiles(n, t) == 7 * 13


def test_kept_fractions():
    n, t = 4096, 333
    s2 = (n + t) ** 2
    assert kept_fraction("full", n, t, False) == 1.0
    assert kept_fraction("cache", n, t, False) == 0.0
    assert kept_fraction("cfg_share", n, t, False) == 0.5
    a8 = kept_fraction("arrow:8", n, t, False)
    w = n // 16
    band = n + 2 * (w * n - w * (w + 1) // 2)
    assert a8 == pytest.approx((s2 - n * n + band) / s2)
    # the paper's approximation (saving ≈ (N − N/(2k))² / S²) is close to the exact count
    assert 1 - a8 == pytest.approx((n - n / 16) ** 2 / s2, rel=0.02)
    assert kept_fraction("wars:8", n, t, False) == a8
    assert kept_fraction("cfg_share+arrow:8", n, t, False) == 0.5 * a8
    assert kept_fraction("arrow:16", n, t, False) < a8 < kept_fraction("arrow:4", n, t, False)
    tiles = kept_fraction("arrow:8", n, t, False, blocks=(128, 64))
    assert a8 <= tiles < 1  # the kernel visits whole tiles
    assert kept_fraction("arrow:8", n, t, True, blocks=(128, 64)) == pytest.approx(tiles, abs=0.01)
    assert attention_flops(n, t, 64) == 4 * s2 * 64


def test_plan_stats_weights_layers_and_counts_residuals():
    info = model_info_for(SD3Config(num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                    caption_projection_dim=16, dual_attention_layers=(0,)), text_tokens=64)
    assert info["layers"] == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2"]
    methods = ["full", "cache", "arrow:8", "wars:4"]
    a = np.zeros((4, 2, 2), np.int32)
    a[1:, 0, :] = 1  # joint layer: cached after step 0
    a[1:, 1, 0] = 2  # attn2 (image only) head 0: arrow
    a[2, 1, 1] = 3  # attn2 head 1: wars at step 2 -> step 1 (full) computes the residual window too
    plan = Plan(info, 4, methods, a)
    n = 256
    stats = plan_stats(plan, n)
    s_joint, s_img = (n + 64) ** 2, n ** 2
    kj = np.array([1, 0, 0, 0])  # per step, both heads of the joint layer
    arrow_img = kept_fraction("arrow:8", n, 0, False)
    wars_img = kept_fraction("wars:4", n, 0, False)
    h0 = np.array([1, arrow_img, arrow_img, arrow_img])
    h1 = np.array([1, 1 + wars_img, wars_img, 1])  # step 1 is the last full step before the wars step
    np.testing.assert_allclose(kept_table(plan, n)[:, 1, 1], h1)
    per_layer = [kj.mean(), (h0.mean() + h1.mean()) / 2]
    np.testing.assert_allclose(stats["per_layer"], per_layer)
    overall = (per_layer[0] * s_joint + per_layer[1] * s_img) / (s_joint + s_img)
    assert stats["attention_flops_kept"] == pytest.approx(overall)
    per_step = (kj * s_joint + (h0 + h1) / 2 * s_img) / (s_joint + s_img)
    np.testing.assert_allclose(stats["per_step"], per_step)
    assert stats["method_counts"] == {"full": 6, "cache": 6, "arrow:8": 3, "wars:4": 1}
    assert stats["attention_flops_dense"] == 4 * 8 * 2 * 4 * (s_joint + s_img)
    tiles = plan_stats(plan, n, blocks=(16, 16))
    assert tiles["attention_flops_kept"] >= stats["attention_flops_kept"] - 1e-12
