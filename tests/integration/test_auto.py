"""attend() end to end: which backend auto picks, that AttentionOutput.backend says so, the
registry's mechanism (cheapest serving backend, refusals, flex threshold), and a training
step that gives the same update whichever backend computes it."""

from __future__ import annotations

import pytest
import torch

import headwise
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


@pytest.fixture
def tuning_file(tmp_path, monkeypatch):
    """A tuning file of the test's own (auto reads HEADWISE_TUNING_FILE)."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("HEADWISE_TUNING_FILE", str(path))
    clear_choice_cache()
    yield path
    clear_choice_cache()


def test_auto_runs_one_backend_with_bitwise_equal_outputs(tuning_file):
    """100 calls of one problem, forward and forward + backward: one backend, identical bits."""
    q, k, v = _qkv(1, 4, 2, 64, 64, 16)
    first = attend(q, k, v, mask=causal)
    outs = [attend(q, k, v, mask=causal) for _ in range(100)]
    assert {o.backend for o in outs} == {first.backend}
    assert all(torch.equal(o.out, first.out) for o in outs)
    grads, backends = [], set()
    for _ in range(100):
        qg = q.clone().requires_grad_()
        res = attend(qg, k, v, mask=sliding_window(16))
        res.out.square().sum().backward()
        grads.append(qg.grad)
        backends.add(res.backend)
    assert len(backends) == 1
    assert all(torch.equal(g, grads[0]) for g in grads)


def test_auto_never_times_anything_on_its_own(patched_costs, slowed, tuning_file):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    patched_costs({"sdpa": 1.0, "tiled": 1.5, "eager": 10.0, "flex": 10.0, "reference": 1.2})
    slowed({"sdpa": 0.01})  # the old auto measured and moved to tiled here
    assert {attend(q, k, v).backend for _ in range(20)} == {"sdpa"}


def test_tune_records_the_fastest_and_auto_follows_it(patched_costs, slowed, tuning_file):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    patched_costs({"sdpa": 1.0, "tiled": 1.5, "eager": 10.0, "flex": 10.0, "reference": 10.0})
    slowed({"sdpa": 0.02})
    assert attend(q, k, v, mask=causal).backend == "sdpa"  # the cost model
    result = headwise.tune(q, k, v, mask=causal, rounds=2, backends=("sdpa", "tiled"))
    assert result["backend"] == "tiled" and result["median_ms"]["sdpa"] > result["median_ms"]["tiled"]
    assert tuning_file.is_file() and result["file"] == str(tuning_file)
    assert attend(q, k, v, mask=causal).backend == "tiled"
    assert "tuned on this machine" in headwise.plan(q.shape, k.shape, mask=causal).explain()
    assert attend(q, k, v).backend == "sdpa"  # another problem (no mask): not tuned
    assert list(headwise.tuned().values())[0]["backend"] == "tiled"
    assert headwise.clear_tuning() and not tuning_file.exists()
    assert attend(q, k, v, mask=causal).backend == "sdpa"


def test_a_tuned_backend_that_no_longer_serves_is_ignored(tuning_file):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    headwise.tune(q, k, v, rounds=1, backends=("sdpa",))
    assert attend(q, k, v).backend == "sdpa"
    assert attend(q, k, v, need_weights=True).backend == "eager"  # another problem, and sdpa refuses it


def test_tune_refuses_what_it_cannot_record(tuning_file):
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(HeadwiseError, match="mask: expected a structured mask"):
        headwise.tune(q, k, v, mask=lambda b, h, i, j: i >= j)
    with pytest.raises(HeadwiseError, match="rounds"):
        headwise.tune(q, k, v, rounds=0)
    with pytest.raises(HeadwiseError, match="none of"):
        headwise.tune(q, k, v, need_weights=True, backends=("tiled", "sdpa"))
    assert not tuning_file.exists()


def test_a_damaged_tuning_file_is_ignored(tuning_file):
    tuning_file.write_text("{not json")
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    assert attend(q, k, v).backend in backend_names()
    assert headwise.tuned() == {}


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
