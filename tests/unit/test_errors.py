"""Every bad input raises HeadwiseError (a ValueError) whose message names the argument."""

from __future__ import annotations

import re

import pytest
import torch

from headwise import (
    HeadwiseError,
    alibi,
    alibi_slopes,
    attend,
    causal,
    padding,
    per_head_windows,
    sliding_window,
    softcap,
)


def qkv(B=2, Hq=4, Hkv=2, L=5, S=6, E=8, Ev=3, dtype=torch.float32):
    return (
        torch.randn(B, Hq, L, E, dtype=dtype),
        torch.randn(B, Hkv, S, E, dtype=dtype),
        torch.randn(B, Hkv, S, Ev, dtype=dtype),
    )


def raises(name: str):
    """HeadwiseError whose message starts with the argument's name (the canonical form)."""
    return pytest.raises(HeadwiseError, match="^" + re.escape(name) + ": expected")


def test_headwise_error_is_a_value_error():
    assert issubclass(HeadwiseError, ValueError)
    q, k, v = qkv()
    with pytest.raises(ValueError):
        attend(q[0], k, v)


# ---------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize(
    "which,bad,name",
    [
        ("q", torch.randn(4, 5, 8), "q"),
        ("k", torch.randn(2, 2, 2, 6, 8), "k"),
        ("v", torch.randn(6, 3), "v"),
    ],
)
def test_wrong_rank(which, bad, name):
    args = dict(zip("qkv", qkv()))
    args[which] = bad
    with raises(name) as info:
        attend(args["q"], args["k"], args["v"])
    assert "4-d tensor" in str(info.value) and str(tuple(bad.shape)) in str(info.value)


def test_not_a_tensor():
    q, k, v = qkv()
    with raises("k"):
        attend(q, k.tolist(), v)


def test_mismatched_batch():
    q, k, v = qkv()
    with raises("k, v"):
        attend(q, k[:1], v[:1])


def test_mismatched_head_dim():
    q, k, v = qkv()
    with raises("k") as info:
        attend(q, k[..., :7], v)
    assert "E = 8" in str(info.value)


def test_mismatched_value_heads_or_length():
    q, k, v = qkv()
    with raises("v"):
        attend(q, k, v[:, :1])
    with raises("v"):
        attend(q, k, v[:, :, :5])


@pytest.mark.parametrize("hq,hkv", [(4, 3), (6, 4), (2, 4)])
def test_query_heads_not_divisible_by_kv_heads(hq, hkv):
    q, k, v = qkv(Hq=hq, Hkv=hkv)
    with raises("k") as info:
        attend(q, k, v)
    assert f"dividing Hq = {hq}" in str(info.value)


def test_empty_dimension():
    q, k, v = qkv(L=5)
    with raises("q, k, v"):
        attend(q[:, :, :0], k, v)


# ---------------------------------------------------------------------------------------
# Values, dtypes, devices


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_are_refused(which, bad):
    args = dict(zip("qkv", qkv()))
    args[which][1, 0, 2, 1] = bad
    with raises(which) as info:
        attend(args["q"], args["k"], args["v"], check_finite=True)
    assert "NaN or Inf" in str(info.value)


def test_non_finite_inputs_pass_through_by_default():
    """Off by default, like torch: the check is a reduction and a host sync per call."""
    args = dict(zip("qkv", qkv()))
    args["k"][1, 0, 2, 1] = float("nan")
    out = attend(args["q"], args["k"], args["v"], backend="tiled").out
    assert not torch.isfinite(out[1]).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize(
    "backend,which",
    [(b, w) for b in ("eager", "tiled", "reference") for w in "qkv"],
)
def test_check_finite_false_lets_nan_propagate(backend, which):
    args = dict(zip("qkv", qkv()))
    args[which][1, 0, 2, 1] = float("nan")
    out = attend(args["q"], args["k"], args["v"], check_finite=False, backend=backend).out
    assert not torch.isfinite(out[1]).all(), "check_finite=False should let the NaN through"
    assert torch.isfinite(out[0]).all(), "batch element 0 holds no bad value and must stay finite"


@pytest.mark.parametrize(
    "backend,grad",
    [
        ("tiled", True),
        ("eager", False),
        ("eager", True),
        ("reference", False),
    ],
)
@pytest.mark.parametrize("which", ["q", "k"])
def test_lse_of_a_nan_row_is_not_the_empty_row_marker(backend, grad, which):
    args = dict(zip("qkv", qkv()))
    args[which][1, 0, 2, 1] = float("nan")
    args["q"].requires_grad_(grad)
    res = attend(args["q"], args["k"], args["v"], check_finite=False, backend=backend)
    assert not torch.isneginf(res.lse).any(), "no mask: no row is empty"
    assert not torch.isfinite(res.lse[1]).all()


def test_finite_but_huge_inputs_pass_the_check():
    """The cheap sum-based check must not mistake an overflowing sum for an Inf entry."""
    q, k, v = qkv()
    big = torch.full_like(v, 3e38)
    attend(q, k, big, backend="reference", check_finite=True)  # no error


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_dtypes(dtype):
    q, k, v = qkv()
    with raises("q"):
        attend(q.to(dtype), k, v)
    with raises("v"):
        attend(q, k, v.to(dtype))


def test_mismatched_dtypes():
    q, k, v = qkv()
    with raises("k, v") as info:
        attend(q, k.double(), v)
    assert "float64" in str(info.value)
    with raises("k, v"):
        attend(q, k, v.to(torch.bfloat16))


def test_mismatched_devices():
    q, k, v = qkv()
    k_meta = torch.empty(k.shape, device="meta")
    with raises("k, v") as info:
        attend(q, k_meta, v)
    assert "meta" in str(info.value)


# ---------------------------------------------------------------------------------------
# Scalars and flags


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), True, "0.5", torch.tensor(0.5)])
def test_bad_scale(scale):
    q, k, v = qkv()
    with raises("scale"):
        attend(q, k, v, scale=scale)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.1", None])
def test_bad_dropout_p(p):
    q, k, v = qkv()
    with raises("dropout_p"):
        attend(q, k, v, dropout_p=p)


@pytest.mark.parametrize("flag", ["need_weights", "need_stats"])
def test_non_bool_flags(flag):
    q, k, v = qkv()
    with raises(flag):
        attend(q, k, v, **{flag: 1})


def test_unknown_backend_lists_the_known_ones():
    q, k, v = qkv()
    with raises("backend") as info:
        attend(q, k, v, backend="flash3")
    for name in ("auto", "reference", "tiled", "sdpa", "flex"):
        assert f"'{name}'" in str(info.value)
    with raises("backend"):
        attend(q, k, v, backend=None)


def test_explicit_backend_that_refuses_says_why():
    q, k, v = qkv()
    with pytest.raises(HeadwiseError, match=r"^backend: 'sdpa' cannot serve this call: .*softcap") as info:
        attend(q, k, v, score=softcap(5.0), backend="sdpa")
    assert "need_stats" not in str(info.value)
    with pytest.raises(HeadwiseError, match=r"^backend: 'tiled' cannot serve.*need_weights=True.*dropout_p > 0"):
        attend(q, k, v, need_weights=True, dropout_p=0.5, backend="tiled")


# ---------------------------------------------------------------------------------------
# Masks and scores that do not fit the call


@pytest.mark.parametrize("window", [0, -2])
def test_window_not_positive(window):
    with raises("window"):
        sliding_window(window)


@pytest.mark.parametrize(
    "lengths,needle",
    [([7, 2], r"\[0, 6\]"), ([-1, 2], r"\[0, 6\]"), ([1, 2, 3], r"shape \(2,\)"), ([3], r"shape \(2,\)")],
)
def test_key_lengths_out_of_range_or_wrong_shape(lengths, needle):
    q, k, v = qkv(S=6)
    with pytest.raises(HeadwiseError, match=r"^key_lengths: expected .*" + needle):
        attend(q, k, v, mask=padding(lengths))


def test_key_lengths_not_integers():
    with raises("key_lengths"):
        padding([1.0, 2.0])


def test_per_head_windows_count_not_heads():
    q, k, v = qkv(Hq=4)
    with raises("windows") as info:
        attend(q, k, v, mask=per_head_windows([1, 2, None]))
    assert "(4)" in str(info.value) and "3 windows" in str(info.value)


def test_alibi_slopes_count_not_heads():
    q, k, v = qkv(Hq=4)
    with raises("slopes") as info:
        attend(q, k, v, score=alibi(alibi_slopes(2)))
    assert "(4)" in str(info.value)
    with raises("slopes"):
        attend(q, k, v, score=[softcap(2.0), alibi(alibi_slopes(8))])


@pytest.mark.parametrize(
    "mask",
    [3, "causal", torch.ones(5, 6), torch.ones(5, 6, dtype=torch.long), torch.ones(2, 4, 5, 7, dtype=torch.bool)],
    ids=["int", "str", "float_tensor", "long_tensor", "wrong_shape"],
)
def test_bad_mask(mask):
    q, k, v = qkv()
    with raises("mask"):
        attend(q, k, v, mask=mask)


def test_bad_mask_inside_a_combination():
    q, k, v = qkv(S=6)
    with raises("key_lengths"):
        attend(q, k, v, mask=causal & padding([9, 9]))


# Mask functions returning the wrong thing (#19 item 7). A float tensor is the dangerous one:
# SDPA read it as an additive bias, so the mask silently vanished.
BAD_MASK_FUNCTIONS = {
    "float_tensor": (lambda b, h, q, kv: (kv <= q).float(), "a torch.float32 tensor"),
    "python_bool": (lambda b, h, q, kv: True, "True, not a tensor"),
    "none": (lambda b, h, q, kv: None, "None, not a tensor"),
    "int_tensor": (lambda b, h, q, kv: (kv <= q).int(), "a torch.int32 tensor"),
    "wrong_shape": (lambda b, h, q, kv: torch.ones(3, dtype=torch.bool), "shape (3,)"),
    "a_dense_L_x_S": (lambda b, h, q, kv: torch.ones(5, 6, dtype=torch.bool).tril(1), "shape (5, 6)"),
    "numpy": (lambda b, h, q, kv: (kv <= q).numpy(), "ndarray, not a tensor"),
}


@pytest.mark.parametrize("backend", ["auto", "reference", "eager", "tiled", "sdpa", "flex"])
@pytest.mark.parametrize("case", list(BAD_MASK_FUNCTIONS))
def test_mask_function_returning_the_wrong_thing_is_refused_on_every_backend(case, backend):
    fn, got = BAD_MASK_FUNCTIONS[case]
    q, k, v = qkv()
    for mask in (fn, causal & fn):  # alone, and inside a combination
        with raises("mask") as info:
            attend(q, k, v, mask=mask, backend=backend)
        assert "torch.bool tensor" in str(info.value) and got in str(info.value)


def test_float_mask_function_no_longer_becomes_an_sdpa_bias():
    """The float version of causal used to give SDPA outputs 0.86 away from causal ones."""
    q, k, v = qkv()
    want = attend(q, k, v, mask=causal, backend="sdpa").out
    with raises("mask"):
        attend(q, k, v, mask=lambda b, h, qi, kv: (kv <= qi).float(), backend="sdpa")
    got = attend(q, k, v, mask=lambda b, h, qi, kv: kv <= qi, backend="sdpa").out
    torch.testing.assert_close(got, want)


def test_mask_function_is_checked_once_per_call_and_once_for_a_reused_mask():
    """One probe on a 2 x 2 corner of the grid per call (not per block); a Mask object that is
    reused for the same problem size is not probed again."""
    from headwise.masks import as_mask

    grids = []

    def fn(b, h, qi, kv):
        grids.append(tuple(torch.broadcast_shapes(b.shape, h.shape, qi.shape, kv.shape)))
        return kv <= qi

    q, k, v = qkv(L=40, S=40)
    attend(q, k, v, mask=fn, backend="reference")
    assert grids == [(2, 4, 2, 2), (2, 4, 40, 40)]  # the probe, then the reference's own evaluation
    mask = as_mask(fn)
    attend(q, k, v, mask=mask, backend="reference")
    grids.clear()
    attend(q, k, v, mask=mask, backend="reference")
    assert grids == [(2, 4, 40, 40)]
    grids.clear()
    attend(*qkv(L=7, S=9), mask=mask, backend="reference")  # another size: probed again
    assert grids[0] == (2, 4, 2, 2)


@pytest.mark.parametrize("backend", ["reference", "eager", "tiled", "sdpa"])
def test_mask_functions_of_any_broadcastable_shape_are_accepted(backend):
    """Scalars, (S,)-broadcasting and full-grid results are all valid mask outputs."""
    q, k, v = qkv()
    for fn in (
        lambda b, h, qi, kv: torch.tensor(True),
        lambda b, h, qi, kv: kv < 4,
        lambda b, h, qi, kv: (kv <= qi) & (b >= 0) & (h >= 0),
    ):
        out = attend(q, k, v, mask=fn, backend=backend).out
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("score", [3, "alibi", object()], ids=["int", "str", "object"])
def test_bad_score(score):
    q, k, v = qkv()
    with raises("score"):
        attend(q, k, v, score=score)
