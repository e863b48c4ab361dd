"""attend() end to end: which backend auto picks, that AttentionOutput.backend says so, the
registry's mechanism (cheapest serving backend, refusals, flex threshold), and a training
step that gives the same update whichever backend computes it."""

from __future__ import annotations

import pytest
import torch

from headwise import (
    AttentionOutput,
    HeadwiseError,
    alibi,
    alibi_slopes,
    attend,
    causal,
    padding,
    sliding_window,
    softcap,
)
from headwise.attend import make_request
from headwise.kernels import registry
from headwise.kernels.base import Backend
from headwise.kernels.registry import backend_names, backend_table, choose, clear_choice_cache, explain, get_backend

SHAPE = (1, 8, 2, 128, 128, 64)  # B, Hq, Hkv, L = S, E: big enough for the cost model to matter


def _qkv(B, Hq, Hkv, L, S, E, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, L, E, generator=g, dtype=dtype),
        torch.randn(B, Hkv, S, E, generator=g, dtype=dtype),
        torch.randn(B, Hkv, S, E, generator=g, dtype=dtype),
    )


def _request(q, k, v, mask=None, score=None, need_weights=False, need_stats=False, dropout_p=0.0):
    return make_request(q, k, v, mask, score, None, dropout_p, need_weights, need_stats)


# ---------------------------------------------------------------------------------------
# What auto picks, and that it says so


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({}, "sdpa"),
        ({"mask": causal}, "sdpa"),
        # A small dense problem: materialising query chunk by chunk beats the tiled loop.
        ({"need_stats": True}, "eager"),
        ({"mask": sliding_window(16), "need_stats": True}, "tiled"),
        ({"need_weights": True}, "eager"),
        ({"mask": causal, "need_weights": True, "need_stats": True}, "eager"),
    ],
    ids=["plain", "causal", "stats", "window_stats", "weights", "causal_weights_stats"],
)
def test_auto_choice_and_reported_backend(kwargs, expected):
    B, Hq, Hkv, L, E = SHAPE[0], SHAPE[1], SHAPE[2], SHAPE[3], SHAPE[5]
    q, k, v = _qkv(B, Hq, Hkv, L, L, E)
    res = attend(q, k, v, **kwargs)
    assert isinstance(res, AttentionOutput)
    assert res.backend == expected
    gold = attend(q.double(), k.double(), v.double(), backend="reference", **kwargs)
    assert (res.out.double() - gold.out).abs().max() < 1e-4
    assert (res.weights is not None) == kwargs.get("need_weights", False)
    assert (res.stats is not None) == kwargs.get("need_stats", False)


@pytest.mark.parametrize("name", ["reference", "eager", "tiled", "sdpa"])
def test_explicit_backend_is_the_one_that_ran(name):
    q, k, v = _qkv(2, 4, 2, 9, 11, 8, dtype=torch.float64)
    res = attend(q, k, v, mask=padding([0, 11]), backend=name)
    assert res.backend == name
    gold = attend(q, k, v, mask=padding([0, 11]), backend="reference")
    assert torch.allclose(res.out, gold.out, atol=1e-12, rtol=0)


def test_explain_covers_every_backend_and_the_reference_serves_everything():
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    reqs = [
        _request(q, k, v),
        _request(q, k, v, mask=causal, score=softcap(2.0), need_weights=True, need_stats=True, dropout_p=0.1),
    ]
    for req in reqs:
        reasons = explain(req)
        assert set(reasons) == set(backend_names()) >= {"reference", "eager", "tiled", "sdpa", "flex"}
        assert reasons["reference"] == []
        assert all(isinstance(r, str) and r for rs in reasons.values() for r in rs)
    everything = explain(reqs[1])
    assert everything["sdpa"] and everything["tiled"] and everything["flex"]


def test_backend_table_lists_every_backend():
    table = backend_table()
    for name in backend_names():
        assert f"| `{name}` |" in table


# ---------------------------------------------------------------------------------------
# The mechanism: cheapest serving backend; flex only for large calls


@pytest.fixture
def patched_costs(monkeypatch):
    """Set chosen backends' estimated cost; every other backend costs 1 second."""

    def patch(costs):
        clear_choice_cache()  # choices made under the real costs must not be reused
        for name in backend_names():
            cost = costs.get(name, 1.0)
            monkeypatch.setattr(get_backend(name), "cost", lambda req, c=cost: c)

    yield patch
    clear_choice_cache()


@pytest.mark.parametrize("cheapest", ["reference", "eager", "tiled", "sdpa"])
def test_auto_runs_the_cheapest_backend_that_serves(patched_costs, cheapest):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    patched_costs({cheapest: 0.0})
    res = attend(q, k, v, mask=causal)
    assert res.backend == cheapest


def test_auto_skips_a_cheaper_backend_that_refuses(patched_costs):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    patched_costs({"tiled": 0.0, "sdpa": 0.0, "eager": 0.5})
    assert attend(q, k, v, need_weights=True).backend == "eager"  # tiled and sdpa refuse weights
    assert attend(q, k, v, dropout_p=0.1).backend == "sdpa"  # tiled refuses dropout
    assert attend(q, k, v, need_stats=True).backend == "tiled"


def test_auto_considers_flex_only_for_large_calls(patched_costs):
    patched_costs({"flex": 0.0})
    small = _qkv(1, 8, 2, 64, 64, 16)
    assert choose(_request(*small), "auto").name != "flex"
    # 8 heads x 1024 x 1024 = 2^23 >= 2^22 query-key pairs (chosen, not run: no compile here).
    large = _qkv(1, 8, 2, 1024, 1024, 16)
    assert choose(_request(*large), "auto").name == "flex"
    with torch.enable_grad():
        q = large[0].clone().requires_grad_()
        assert choose(_request(q, *large[1:]), "auto").name != "flex"  # no backward on CPU


@pytest.fixture
def slowed(monkeypatch):
    """Make chosen backends' run() slower by a fixed sleep (their results stay exact)."""

    def patch(delays):
        import time as _time

        for name, delay in delays.items():
            b = get_backend(name)
            real = b.run
            monkeypatch.setattr(b, "run", lambda req, real=real, delay=delay: (_time.sleep(delay), real(req))[1])

    return patch


def test_auto_measures_a_recurring_problem_and_settles_on_the_fastest(patched_costs, slowed):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    # The estimates favour sdpa, but tiled (within the margin) is measurably faster; eager is
    # estimated far slower and never measured; the reference is never a contender.
    patched_costs({"sdpa": 1.0, "tiled": 1.5, "eager": 10.0, "flex": 10.0, "reference": 1.2})
    slowed({"sdpa": 0.02})
    ran = [attend(q, k, v).backend for _ in range(13)]
    assert ran[:2] == ["sdpa", "sdpa"]  # first calls: the estimate
    assert sorted(ran[2:10]) == ["sdpa"] * 4 + ["tiled"] * 4  # measured four times each, in turn
    assert ran[10:] == ["tiled"] * 3  # settled
    assert registry.settled_choice(_request(q, k, v)) == "tiled"
    assert choose(_request(q, k, v), "auto").name == "tiled"
    gold = attend(q, k, v, backend="reference").out
    assert torch.allclose(attend(q, k, v).out, gold, atol=1e-5)


@pytest.mark.parametrize(
    ("tiled_seconds", "calls_each"),
    [(1.05, registry.AUTO_EXPLORE_MAX_ROUNDS), (2.0, registry.AUTO_EXPLORE_ROUNDS)],
)
def test_auto_measures_a_close_race_longer(tiled_seconds, calls_each):
    # Fed fixed times (sleeps would make the race's closeness depend on the machine's load):
    # a runner-up within AUTO_EXPLORE_CLOSE keeps both measured up to AUTO_EXPLORE_MAX_ROUNDS
    # calls each; a clear race settles after AUTO_EXPLORE_ROUNDS.
    state = registry._AutoState("sdpa", ("sdpa", "tiled"))
    times = {"sdpa": 1.0, "tiled": tiled_seconds}
    for call in range(1, calls_each + 1):
        for name in ("sdpa", "tiled"):
            assert state.settled is None, (call, name)
            state.record(name, times[name] * (5.0 if call == 1 else 1.0))  # a slow first call is dropped
    assert state.settled == "sdpa"
    assert {n: len(t) for n, t in state.times.items()} == {"sdpa": calls_each, "tiled": calls_each}


def test_auto_does_not_hold_a_slow_first_call_against_a_backend(patched_costs, slowed, monkeypatch):
    import time as _time

    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    patched_costs({"sdpa": 1.0, "tiled": 1.5, "eager": 10.0, "flex": 10.0})
    slowed({"sdpa": 0.01})
    tiled, real, calls = get_backend("tiled"), get_backend("tiled").run, []

    def compiles_first(req):  # like FlexAttention's first call of a shape
        calls.append(1)
        if len(calls) == 1:
            _time.sleep(0.2)
        return real(req)

    monkeypatch.setattr(tiled, "run", compiles_first)
    for _ in range(12):
        attend(q, k, v)
    assert registry.settled_choice(_request(q, k, v)) == "tiled"


def test_auto_keeps_the_estimate_under_autograd_and_when_told(patched_costs, slowed):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    patched_costs({"sdpa": 0.5, "tiled": 0.7, "flex": 10.0})
    slowed({"sdpa": 0.01})
    qg = q.clone().requires_grad_()
    assert {attend(qg, k, v).backend for _ in range(8)} == {"sdpa"}  # backward happens out of sight
    assert registry.settled_choice(_request(qg, k, v)) is None
    registry.set_auto_exploration(False)
    try:
        assert {attend(q, k, v).backend for _ in range(8)} == {"sdpa"}
    finally:
        registry.set_auto_exploration(True)


def test_auto_with_one_close_contender_never_measures(patched_costs):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    patched_costs({"sdpa": 0.1})  # every other backend: 1 s, 10x the estimate, outside the margin
    assert {attend(q, k, v).backend for _ in range(8)} == {"sdpa"}
    assert registry.settled_choice(_request(q, k, v)) is None


def test_custom_backend_registration(monkeypatch):
    class Doubling(Backend):
        name = "doubling"
        capabilities = {}

        def refusals(self, req):
            return ["no weights here"] if req.need_weights else []

        def cost(self, req):
            return 0.0

        def run(self, req):
            out = get_backend("reference").run(req).out * 2
            return AttentionOutput(out=out, weights=None, stats=None, lse=None, backend=self.name)

    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    registry.register_backend(Doubling())
    q, k, v = _qkv(1, 2, 1, 4, 4, 8)
    ref = attend(q, k, v, backend="reference").out
    res = attend(q, k, v)
    assert res.backend == "doubling" and torch.allclose(res.out, 2 * ref)
    assert attend(q, k, v, need_weights=True).backend != "doubling"
    with pytest.raises(HeadwiseError, match="no weights here"):
        attend(q, k, v, need_weights=True, backend="doubling")
    with pytest.raises(HeadwiseError, match="^backend: expected a headwise Backend"):
        registry.register_backend(object())


# ---------------------------------------------------------------------------------------
# A training step is the same whichever backend computes it


def _train_step(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, L, D = 2, 4, 2, 12, 8
    x = torch.randn(B, L, 16, generator=g, dtype=torch.float64)
    wq = torch.randn(16, H * D, generator=g, dtype=torch.float64).mul_(0.3).requires_grad_()
    wkv = torch.randn(16, 2 * Hkv * D, generator=g, dtype=torch.float64).mul_(0.3).requires_grad_()
    slopes = alibi_slopes(H).double().requires_grad_()
    q = (x @ wq).view(B, L, H, D).transpose(1, 2)
    k, v = (x @ wkv).view(B, L, 2, Hkv, D).permute(2, 0, 3, 1, 4)
    res = attend(q, k, v, mask=causal & padding([12, 7]), score=[alibi(slopes), softcap(4.0)], backend=backend)
    loss = res.out.square().mean()
    loss.backward()
    with torch.no_grad():
        for p in (wq, wkv, slopes):
            p -= 0.5 * p.grad
    return res.backend, loss.detach().item(), (wq.detach(), wkv.detach(), slopes.detach())


@pytest.mark.parametrize("backend", ["tiled", "eager", "auto"])
def test_training_step_matches_the_reference(backend):
    _, loss_ref, params_ref = _train_step("reference")
    ran, loss, params = _train_step(backend)
    assert ran != "reference"
    assert loss == pytest.approx(loss_ref, abs=1e-12)
    for a, b in zip(params, params_ref):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    # The step really moved the slopes (their gradient reached them through the score).
    assert (params[2] - alibi_slopes(4).double()).abs().max() > 1e-4
