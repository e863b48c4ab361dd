"""Masks as exact dense matrices: the ASCII pictures of the docstrings, alignment, algebra."""

from __future__ import annotations

import pytest
import torch

from headwise import (
    HeadwiseError,
    and_masks,
    causal,
    chunked,
    local,
    or_masks,
    padding,
    per_head_windows,
    sliding_window,
)
from headwise.masks import EMPTY, FULL, PARTIAL, as_mask, classify_blocks


def picture(text: str) -> torch.Tensor:
    """'x' = may attend, '.' = masked; one row per line (as drawn in the docstrings)."""
    rows = [line.split() for line in text.strip().splitlines()]
    return torch.tensor([[c == "x" for c in row] for row in rows])


def dense2d(mask, L, S, B=1, H=1, b=0, h=0):
    return mask.dense(B, H, L, S).expand(B, H, L, S)[b, h]


# ---------------------------------------------------------------------------------------
# The docstring pictures, exactly.


def test_causal_bottom_right_L2_S5():
    want = picture(
        """
        x x x x .
        x x x x x
        """
    )
    assert torch.equal(dense2d(causal, 2, 5), want)


def test_causal_square():
    want = picture(
        """
        x . . .
        x x . .
        x x x .
        x x x x
        """
    )
    assert torch.equal(dense2d(causal, 4, 4), want)


def test_sliding_window_2():
    want = picture(
        """
        x . . .
        x x . .
        . x x .
        . . x x
        """
    )
    assert torch.equal(dense2d(sliding_window(2), 4, 4), want)


def test_local_1_1():
    want = picture(
        """
        x x . .
        x x x .
        . x x x
        . . x x
        """
    )
    assert torch.equal(dense2d(local(1, 1), 4, 4), want)


def test_chunked_2():
    want = picture(
        """
        x x . .
        x x . .
        . . x x
        . . x x
        """
    )
    assert torch.equal(dense2d(chunked(2), 4, 4), want)


def test_padding_3():
    want = picture(
        """
        x x x .
        x x x .
        x x x .
        x x x .
        """
    )
    assert torch.equal(dense2d(padding([3]), 4, 4), want)


def test_per_head_windows_1_none():
    head0 = picture(
        """
        x . . .
        . x . .
        . . x .
        . . . x
        """
    )
    head1 = picture(
        """
        x . . .
        x x . .
        x x x .
        x x x x
        """
    )
    m = per_head_windows([1, None])
    assert torch.equal(dense2d(m, 4, 4, H=2, h=0), head0)
    assert torch.equal(dense2d(m, 4, 4, H=2, h=1), head1)


def test_module_example_sliding_window_and_padding():
    want = picture(
        """
        x . . .
        x x . .
        . x x .
        . . x .
        """
    )
    m = and_masks(sliding_window(2), padding(torch.tensor([3])))
    assert torch.equal(dense2d(m, 4, 4), want)


# ---------------------------------------------------------------------------------------
# Bottom-right alignment when L != S (query i sits at key position i + S - L).


def test_sliding_window_cross_attention_aligned_bottom_right():
    want = picture(
        """
        . . . x x .
        . . . . x x
        """
    )
    assert torch.equal(dense2d(sliding_window(2), 2, 6), want)


def test_causal_more_queries_than_keys():
    # L = 4, S = 2: queries 0 and 1 sit before the first key and see nothing.
    want = picture(
        """
        . .
        . .
        x .
        x x
        """
    )
    assert torch.equal(dense2d(causal, 4, 2), want)


def test_chunked_cross_attention_uses_positions():
    # L = 3, S = 5: queries at positions 2, 3, 4; chunks {0,1}, {2,3}, {4}.
    want = picture(
        """
        . . x x .
        . . x x .
        . . . . x
        """
    )
    assert torch.equal(dense2d(chunked(2), 3, 5), want)


def test_function_mask_receives_aligned_positions():
    seen = {}

    def fn(b, h, q, kv):
        seen["q"] = q.flatten().tolist()
        return kv <= q

    assert torch.equal(dense2d(as_mask(fn), 2, 5), dense2d(causal, 2, 5))
    assert seen["q"] == [3, 4]


def test_tensor_mask_is_indexed_by_raw_query_index_and_broadcasts():
    t = torch.tensor([[True, False, True], [False, True, True]])  # (L=2, S=3)
    m = as_mask(t)
    dense = m.dense(2, 3, 2, 3)
    assert dense.shape == (2, 3, 2, 3)
    assert torch.equal(dense, t.expand(2, 3, 2, 3))


def test_padding_per_batch_and_zero_length():
    m = padding([0, 2, 4])
    d = m.dense(3, 1, 2, 4).expand(3, 1, 2, 4)[:, 0]
    assert not d[0].any()
    assert torch.equal(d[1], picture("x x . .\nx x . ."))
    assert d[2].all()


# ---------------------------------------------------------------------------------------
# Algebra


def test_and_or_operators_and_functions():
    a, b = sliding_window(2), local(0, 1)
    da, db = dense2d(a, 5, 5), dense2d(b, 5, 5)
    assert torch.equal(dense2d(and_masks(a, b), 5, 5), da & db)
    assert torch.equal(dense2d(or_masks(a, b), 5, 5), da | db)
    assert torch.equal(dense2d(a & b, 5, 5), da & db)
    assert torch.equal(dense2d(a | b, 5, 5), da | db)
    # Combining with plain functions and tensors aligns each part on its own terms.
    t = torch.zeros(5, 5, dtype=torch.bool)
    t[0, 4] = True
    assert torch.equal(dense2d(or_masks(causal, t), 5, 5), dense2d(causal, 5, 5) | t)


def test_combined_masks_align_each_part_in_cross_attention():
    t = torch.ones(2, 6, dtype=torch.bool)
    t[:, 0] = False
    m = and_masks(causal, t)
    assert torch.equal(dense2d(m, 2, 6), dense2d(causal, 2, 6) & t)


def test_cache_keys_identify_equal_masks():
    assert sliding_window(3).cache_key() == local(2, 0).cache_key()
    assert sliding_window(3).cache_key() != sliding_window(4).cache_key()
    assert padding([1, 2]).cache_key() != padding([2, 1]).cache_key()
    assert and_masks(causal, chunked(2)).cache_key() != or_masks(causal, chunked(2)).cache_key()
    assert as_mask(torch.ones(2, 2, dtype=torch.bool)).cache_key() is None
    assert and_masks(causal, torch.ones(2, 2, dtype=torch.bool)).cache_key() is None


def test_tiled_plan_cache_sees_tensor_mask_changed_in_place():
    """A bool tensor mask edited in place must not reuse a plan made from its old values."""
    from headwise import attend

    q = k = v = torch.randn(1, 1, 8, 4, dtype=torch.float64)
    t = torch.zeros(8, 8, dtype=torch.bool)
    t[:, :2] = True
    first = attend(q, k, v, mask=t, backend="tiled").out
    t[:] = False
    t[:, 6:] = True
    second = attend(q, k, v, mask=t, backend="tiled").out
    want = attend(q, k, v, mask=t, backend="reference").out
    assert torch.allclose(second, want, atol=1e-12)
    assert not torch.allclose(first, second)


# ---------------------------------------------------------------------------------------
# Block classification on hand-checked cases


def test_classify_blocks_causal_by_hand():
    got = classify_blocks(causal, 1, 1, 8, 8, 4, 4, "cpu")
    assert got.tolist() == [[PARTIAL, EMPTY], [FULL, PARTIAL]]
    assert got.dtype == torch.int8


def test_classify_blocks_padding_empty_batch_never_full():
    # Batch 0 has no keys: no block is FULL over all (b, h); keys >= 5 are EMPTY everywhere.
    got = classify_blocks(padding([0, 5]), 2, 1, 4, 8, 2, 4, "cpu")
    assert got.tolist() == [[PARTIAL, PARTIAL], [PARTIAL, PARTIAL]]
    got = classify_blocks(padding([4, 5]), 2, 1, 4, 12, 2, 4, "cpu")
    assert got.tolist() == [[FULL, PARTIAL, EMPTY], [FULL, PARTIAL, EMPTY]]


def test_classify_blocks_per_head_windows_uses_every_head():
    # Head 0 sees only the diagonal, head 1 everything before: the union decides EMPTY.
    got = classify_blocks(per_head_windows([1, None]), 1, 2, 8, 8, 4, 4, "cpu")
    assert got.tolist() == [[PARTIAL, EMPTY], [PARTIAL, PARTIAL]]


def test_classify_blocks_ragged_last_blocks():
    # L = 5, S = 7 with 4 x 4 blocks: the last query block has 1 row, the last key block 3 keys.
    got = classify_blocks(causal, 1, 1, 5, 7, 4, 4, "cpu")
    # positions 2..5 see keys 0..q; position 6 sees all 7 keys.
    assert got.tolist() == [[PARTIAL, PARTIAL], [FULL, FULL]]


# ---------------------------------------------------------------------------------------
# Constructor validation


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: sliding_window(0), "window"),
        (lambda: sliding_window(-3), "window"),
        (lambda: sliding_window(2.5), "window"),
        (lambda: sliding_window(True), "window"),
        (lambda: local(-1, 2), "left"),
        (lambda: local(1, -2), "right"),
        (lambda: chunked(0), "size"),
        (lambda: padding([[1, 2]]), "key_lengths"),
        (lambda: padding([1.5]), "key_lengths"),
        (lambda: per_head_windows([]), "windows"),
        (lambda: per_head_windows([2, 0]), r"windows\[1\]"),
        (lambda: per_head_windows("abc"), "windows"),
        (lambda: and_masks(), "masks"),
        (lambda: or_masks(), "masks"),
        (lambda: as_mask(torch.ones(2, 2)), "mask"),
        (lambda: as_mask(3), "mask"),
    ],
)
def test_bad_mask_arguments_raise_naming_the_argument(make, name):
    with pytest.raises(HeadwiseError, match=f"^{name}: expected"):
        make()
