"""Tiled online-softmax attention ("flash" style) in plain torch ops.

Queries are cut into blocks of ``block_q`` rows and keys into blocks of ``block_k``. For
each query block the kernel visits only the key blocks the mask can reach (EMPTY blocks
are skipped, FULL blocks need no element mask), keeping a running row max ``m``, a running
sum ``l`` of ``exp(s - m)`` and the running output, rescaled whenever ``m`` grows. Memory
is O(block_q * block_k) per head for the logits, never O(L * S). A query block whose logits
are provably within +-BOUNDED_LOGIT_LIMIT (Cauchy-Schwarz over the keys each row may attend,
see kernels/unshifted.py) skips the running max altogether: exp(s) with no shift, nothing to
rescale. Nothing a row's mask excludes changes a bit of its output, lse, statistics or
gradients: masked probabilities are exactly 0 and no decision looks at masked keys.

Streaming statistics come from the same pass. With ``p_j = exp(s_j - m)`` and ``l = sum p_j``, the
entropy of the row is ``log l - sum(p_j (s_j - m)) / l`` and its largest weight is ``max p / l``
(``1 / l`` on the online path); the sum is rescaled like the output when ``m`` changes. It is computed
elementwise (a row dot product of p and s - m), not as ``scale * q . (sum p k) - m * l``: that shortcut
subtracts two numbers of the size of the largest logit and loses the entropy of sharp rows.

The backward pass (FlashAttention-2) recomputes each block's probabilities from the saved
log-sum-exp instead of storing them: ``dS = P * (dP - rowsum(dO * O) + dlse)``, plus the
closed-form gradients of the statistics when a loss uses them (kernels/tiled_stats.py). Score
modifications are differentiated by running autograd on the recomputed block.

GQA folds the G query heads that share a key/value head into the rows of one matmul, so
k and v are never repeated. Half-precision inputs are computed in float32.

Shape legend: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), G = Hq / Hkv.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from headwise.caches import BoundedCache
from headwise.kernels.base import BOUNDED_LOGIT_LIMIT as _BOUNDED_LOGIT_LIMIT
from headwise.kernels.base import AttentionOutput, AttentionStats, Backend, Request
from headwise.kernels.tiled_stats import StatsGrad, row_delta
from headwise.kernels.unshifted import ALL_ROWS, NO_ROWS, unshifted_rows
from headwise.masks import EMPTY, FULL, Mask, classify_blocks
from headwise.scores import Score

# Seconds per flop of a tile, per visited block and per call, fitted to measurements of
# this kernel next to SDPA and FlexAttention on the 2-core reference machine (dense, causal
# and windows of 128 and 512, L = 512 .. 16384); only ratios matter. Scores and statistics
# cost extra passes (scores also take the online-max path), counted as factors.
_SECONDS_PER_FLOP = 1 / 120e9
_SECONDS_PER_BLOCK = 5e-4
_SECONDS_PER_CALL = 5e-4
_SCORE_FACTOR = 1.3
_STATS_FACTOR = 1.3
_BLOCK_CHOICES = (256, 128, 64)
# exp(x) stays a normal float (fast path) down to about these arguments.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -700.0}


@dataclass
class TiledPlan:
    """Which key blocks each query block visits, and whether they need an element mask."""

    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    block_q: int
    block_k: int
    visits: list[list[tuple[int, bool]]]  # per query block: (key block, is_partial)
    mask: Mask | None
    score: Score | None
    scale: float
    spans: list[list[Span]] = field(default_factory=list)  # forward tiles per query block
    # Element masks of partial tiles, evaluated once per plan (see _Blocks.keep).
    keeps: dict = field(default_factory=dict)

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv

    def n_visits(self) -> int:
        return sum(len(v) for v in self.visits)


# A forward tile merges adjacent key blocks of one query block while its logits stay below
# this size: fewer, wider tiles mean fewer rescalings and op dispatches (a sliding window
# of 128 then takes one tile per query block instead of two), and below ~2 MB the tile
# still sits in the caches while it turns into probabilities.
_SPAN_BYTES = 2 << 20

# (first key, end key, key ranges relative to the first key that need the element mask)
Span = tuple[int, int, tuple[tuple[int, int], ...]]


def merge_spans(visits: list[tuple[int, bool]], block_k: int, S: int, max_keys: int) -> list[Span]:
    """Merge runs of adjacent visited key blocks into tiles of at most ``max_keys`` keys.

    >>> merge_spans([(0, False), (1, True), (2, True), (4, False)], 8, 36, 24)
    [(0, 24, ((8, 24),)), (32, 36, ())]
    """
    spans: list[Span] = []
    for jk, partial in visits:
        ks, ke = jk * block_k, min(S, (jk + 1) * block_k)
        if spans and spans[-1][1] == ks and ke - spans[-1][0] <= max_keys:
            s0, _, parts = spans[-1]
            ranges = list(parts)
            if partial:
                if ranges and ranges[-1][1] == ks - s0:
                    ranges[-1] = (ranges[-1][0], ke - s0)
                else:
                    ranges.append((ks - s0, ke - s0))
            spans[-1] = (s0, ke, tuple(ranges))
        else:
            spans.append((ks, ke, ((0, ke - ks),) if partial else ()))
    return spans


def _with_spans(plan: TiledPlan, span_keys: int | None, need_stats: bool) -> TiledPlan:
    """Set the forward tiles: at most ``span_keys`` keys each (default: from _SPAN_BYTES).

    With statistics a tile keeps two buffers (logits and probabilities), so it gets half
    the keys: the pair then takes the same room in the cache.
    """
    if span_keys is None:
        rows = plan.B * plan.Hq * plan.block_q  # logits rows of a full query block, all heads
        span_bytes = _SPAN_BYTES // 2 if need_stats else _SPAN_BYTES
        span_keys = span_bytes // (4 * rows) // plan.block_k * plan.block_k
    plan.spans = [merge_spans(v, plan.block_k, plan.S, max(plan.block_k, span_keys)) for v in plan.visits]
    return plan


_PLANS = BoundedCache("tiled.block_plans", 64)


def make_plan(
    req: Request, block_q: int | None = None, block_k: int | None = None, span_keys: int | None = None
) -> TiledPlan:
    """Classify blocks and pick the block size with the lowest estimated time (cached).

    Explicit ``block_q``/``block_k`` (tests, experiments) keep one tile per key block unless
    ``span_keys`` allows merging adjacent blocks into wider forward tiles.
    """
    B, Hq, Hkv, L, S, E, Ev = req.shape
    if span_keys is None and (block_q is not None or block_k is not None):
        span_keys = 0  # explicit blocks: every key block is its own tile
    mask_key = req.mask.cache_key() if req.mask is not None else ("none",)
    key = (mask_key, B, Hq, Hkv, L, S, E, Ev, block_q, block_k, span_keys, req.need_stats, str(req.q.device))
    key = None if mask_key is None else key
    hit = _PLANS.get(key)
    if hit is not None:
        bq, bk, visits, spans, keeps = hit
        return TiledPlan(B, Hq, Hkv, L, S, bq, bk, visits, req.mask, req.score, req.scale, spans, keeps)
    if block_q is not None or block_k is not None:
        choices = [(block_q or 256, block_k or block_q or 256)]
    elif req.mask is None:
        choices = [(256, 256)]
    else:
        choices = [(b, b) for b in _BLOCK_CHOICES]
    plan = min((_plan_for(req, bq, bk, span_keys) for bq, bk in choices), key=lambda p: _plan_seconds(req, p))
    _PLANS.put(key, (plan.block_q, plan.block_k, plan.visits, plan.spans, plan.keeps), req.mask)
    return plan


def _plan_seconds(req: Request, plan: TiledPlan) -> float:
    """Estimated forward time of a plan: visited blocks x (block flops + a fixed cost per block).

    Counted per visited block, not per merged tile: merging saves dispatches but each
    partial block still costs its mask, and the benchmark (window 128, L = 1024 .. 16384)
    showed merged tiles only ~8% faster than unmerged ones.
    """
    B, Hq, _, _, _, E, Ev = req.shape
    per_block = 2.0 * B * Hq * plan.block_q * plan.block_k * (E + Ev) * _SECONDS_PER_FLOP + _SECONDS_PER_BLOCK
    return plan.n_visits() * per_block


def _plan_for(req: Request, bq: int, bk: int, span_keys: int | None) -> TiledPlan:
    B, Hq, Hkv, L, S, _, _ = req.shape
    nq, nk = -(-L // bq), -(-S // bk)
    if req.mask is None:
        visits = [[(j, False) for j in range(nk)] for _ in range(nq)]
    else:
        # Head index matters only for per-head masks; evaluating all Hq heads keeps it exact.
        kinds = classify_blocks(req.mask, B, Hq, L, S, bq, bk, req.q.device).tolist()
        visits = [[(j, kind != FULL) for j, kind in enumerate(row) if kind != EMPTY] for row in kinds]
    plan = TiledPlan(B, Hq, Hkv, L, S, bq, bk, visits, req.mask, req.score, req.scale)
    return _with_spans(plan, span_keys, req.need_stats)


def estimate_seconds(req: Request) -> float:
    t = _SECONDS_PER_CALL + _plan_seconds(req, make_plan(req))
    t *= (_SCORE_FACTOR if req.score is not None else 1.0) * (_STATS_FACTOR if req.need_stats else 1.0)
    return t * (3.5 if req.needs_grad else 1.0)


# Element masks of partial tiles cached on a plan stay below this many bytes in all.
_KEEP_CACHE_BYTES = 64 << 20


class _Blocks:
    """Index tensors, cached element masks and block logits for one plan (forward and backward)."""

    def __init__(self, plan: TiledPlan, device: torch.device):
        self.plan = plan
        B, Hkv, G = plan.B, plan.Hkv, plan.G
        self.b = torch.arange(B, device=device).view(B, 1, 1, 1, 1)
        self.h = torch.arange(plan.Hq, device=device).view(1, Hkv, G, 1, 1)
        self.device = device

    def keep(self, qs: int, n: int, ks: int, m: int, dtype: torch.dtype, as_bias: bool) -> Tensor:
        """The mask of queries qs..qs+n x keys ks..ks+m, broadcastable 5-d, cached on the plan.

        ``as_bias``: 0 where allowed and -inf where masked (added to logits); otherwise 1/0
        (multiplied into probabilities). The plan cache keeps a window's or a causal mask's
        diagonal tiles from being re-evaluated on every call.
        """
        p = self.plan
        key = (qs, n, ks, m, dtype, as_bias)
        hit = p.keeps.get(key)
        if hit is not None:
            return hit
        qi = torch.arange(qs, qs + n, device=self.device).view(1, 1, 1, n, 1)
        ki = torch.arange(ks, ks + m, device=self.device).view(1, 1, 1, 1, m)
        allowed = p.mask.evaluate(self.b, self.h, qi, ki, p.L, p.S)
        if as_bias:
            # Adding a small broadcast bias is ~4x faster than a broadcast masked_fill.
            keep = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill_(~allowed, float("-inf"))
        else:
            keep = allowed.to(dtype)
        used = p.keeps.get("bytes", 0) + keep.numel() * keep.element_size()
        if used <= _KEEP_CACHE_BYTES:
            p.keeps[key], p.keeps["bytes"] = keep, used
        return keep

    def logits(
        self,
        qb: Tensor,
        kb: Tensor,
        qs: int,
        ks: int,
        partial: tuple[tuple[int, int], ...],
        inplace: bool = False,
        out: Tensor | None = None,
        mask_with_inf: bool = True,
    ) -> tuple[Tensor, list[tuple[int, int, Tensor]]]:
        """Logits of one tile, (B, Hkv, G*n, m), with score modifications and mask.

        ``partial`` lists the key ranges (offsets into the tile) that need the element
        mask; the rest of the tile is fully allowed. Returns the logits and, per partial
        range, ``(start, end, keep)`` with keep the broadcastable 5-d 0/1 float mask.
        ``mask_with_inf=False`` leaves masked logits as they are: the caller zeroes their
        probabilities with ``keep`` (the bounded forward, which takes no row maximum).

        Without a score, ``qb`` must already be multiplied by the scale (done once per
        call instead of once per tile); ``out`` is an optional buffer for the matmul.
        """
        p = self.plan
        B, Hkv, G = p.B, p.Hkv, p.G
        n, m = qb.shape[2] // G, kb.shape[2]
        if p.score is None:
            s = torch.matmul(qb, kb.transpose(-1, -2), out=out if out is not None and m == out.shape[-1] else None)
        else:
            s = p.score.similarity(qb, kb) * p.scale
        if p.score is None and not partial:
            return s, []
        s5 = s.view(B, Hkv, G, n, m)
        if p.score is not None:
            qi = torch.arange(qs, qs + n, device=self.device).view(1, 1, 1, n, 1)
            ki = torch.arange(ks, ks + m, device=self.device).view(1, 1, 1, 1, m)
            s5 = p.score.modify(s5, self.b, self.h, qi + (p.S - p.L), ki).expand(B, Hkv, G, n, m)
        keeps = []
        for a, b in partial:
            if mask_with_inf:
                if not inplace:  # under autograd (the generic backward): never write into the graph's tensors
                    s5, inplace = s5.clone(), True
                s5[..., a:b].add_(self.keep(qs, n, ks + a, b - a, s5.dtype, as_bias=True))
            keeps.append((a, b, self.keep(qs, n, ks + a, b - a, s5.dtype, as_bias=False)))
        return s5.reshape(B, Hkv, G * n, m), keeps

    def apply_keeps(self, p: Tensor, keeps: list[tuple[int, int, Tensor]]) -> Tensor:
        """Zero the masked entries of probabilities ``p`` (B*Hkv or B, Hkv, G*n, m) in place."""
        if keeps:
            B, Hkv, G = self.plan.B, self.plan.Hkv, self.plan.G
            p5 = p.view(B, Hkv, G, -1, p.shape[-1])
            for a, b, keep in keeps:
                p5[..., a:b].mul_(keep)
        return p

    def probabilities(self, t: Tensor, keeps: list[tuple[int, int, Tensor]], out: Tensor | None = None) -> Tensor:
        """exp(t) for t = logits - row shift (t <= 0), with masked entries exactly 0.

        torch's vectorised exp falls to a slow path (10-30x) on lanes that hold -inf or
        values whose exp is denormal. Clamping t at the edge of the normal range keeps it on
        the fast path; the clamp changes only weights below 1e-38 (float32) of a row whose
        largest weight is 1, and masked entries are zeroed exactly afterwards.
        """
        t.clamp_(min=_EXP_FLOOR.get(t.dtype, -87.0))
        p = torch.exp(t, out=out) if out is not None and out.shape == t.shape else torch.exp(t)
        return self.apply_keeps(p, keeps)


def _scaled_queries(plan: TiledPlan, q: Tensor) -> Tensor:
    """Without a score the scale is folded into q once: the tiles then skip a pass."""
    return q * plan.scale if plan.score is None else q


def _tiled_forward(plan: TiledPlan, q: Tensor, k: Tensor, v: Tensor, need_stats: bool):
    """Forward over the plan's tiles. Returns out (B, Hq, L, Ev), lse (B, Hq, L), entropy, max weight.

    Each query block runs one of two exact schemes: no shift at all when its logits are
    provably moderate (see kernels/unshifted.py), else a running row maximum; a block that
    mixes both runs the online scheme with the shift of its unshifted rows held at 0, which
    gives those rows the very same arithmetic as the unshifted scheme.
    """
    B, Hq, Hkv, L, G = plan.B, plan.Hq, plan.Hkv, plan.L, plan.G
    E, Ev = q.shape[-1], v.shape[-1]
    blocks = _Blocks(plan, q.device)
    q5 = _scaled_queries(plan, q).view(B, Hkv, G, L, E)
    v3 = v.view(B * Hkv, -1, Ev)
    unshifted = unshifted_rows(plan, q5, k, blocks, _BOUNDED_LOGIT_LIMIT.get(q5.dtype))
    out = q.new_zeros(B, Hkv, G, L, Ev)
    lse = q.new_full((B, Hkv, G, L), float("-inf"))
    entropy = q.new_zeros(B, Hkv, G, L) if need_stats else None
    max_w = q.new_zeros(B, Hkv, G, L) if need_stats else None
    # Flat buffers for the widest tile; a tile views a prefix, so it stays contiguous.
    widest = max((ke - ks for spans in plan.spans for ks, ke, _ in spans), default=0)
    flat = q.new_empty(B * Hkv * G * plan.block_q * widest)
    pflat = q.new_empty(flat.numel()) if need_stats else None
    for iq, spans in enumerate(plan.spans):
        if not spans:
            continue
        qs = iq * plan.block_q
        n = min(plan.block_q, L - qs)
        tiles = _Tiles(blocks, q5[:, :, :, qs : qs + n].reshape(B, Hkv, G * n, E), k, v3, qs, flat, pflat)
        kind = unshifted[iq]
        if kind is ALL_ROWS:
            m, l_run, acc, ps, top = _bounded_rows(tiles, spans, need_stats)
        else:
            m, l_run, acc, ps, top = _online_rows(tiles, spans, need_stats, None if kind is NO_ROWS else kind)
        has = l_run != 0  # 0: nothing to attend to; NaN (from NaN inputs) stays NaN
        l_safe = torch.where(has, l_run, 1.0)
        rows = (slice(None), slice(None), slice(None), slice(qs, qs + n))
        out[rows] = (acc / l_safe).view(B, Hkv, G, n, Ev)
        lse[rows] = torch.where(has, m + torch.log(l_safe), float("-inf")).view(B, Hkv, G, n)
        if need_stats:
            ent = torch.log(l_safe) - ps / l_safe
            entropy[rows] = torch.where(has, ent.clamp_min(0.0), 0.0).view(B, Hkv, G, n)
            max_w[rows] = torch.where(has, top / l_safe, 0.0).view(B, Hkv, G, n)
    return out.view(B, Hq, L, Ev), lse.view(B, Hq, L), entropy, max_w


@dataclass
class _Tiles:
    """One query block's view of the inputs and the scratch buffers its tiles fill."""

    blocks: _Blocks
    qb: Tensor  # (B, Hkv, G*n, E), scaled
    k: Tensor  # (B, Hkv, S, E)
    v3: Tensor  # (B*Hkv, S, Ev)
    qs: int
    flat: Tensor
    pflat: Tensor | None

    def logits(self, ks: int, ke: int, partial, mask_with_inf: bool) -> tuple[Tensor, list]:
        """(B*Hkv, G*n, ke-ks) logits written into the scratch buffer, and the tile's keeps."""
        B, Hkv, R = self.qb.shape[:3]
        buf = self.flat[: B * Hkv * R * (ke - ks)].view(B, Hkv, R, ke - ks)
        s, keeps = self.blocks.logits(
            self.qb, self.k[:, :, ks:ke], self.qs, ks, partial, inplace=True, out=buf, mask_with_inf=mask_with_inf
        )
        return s.view(B * Hkv, R, ke - ks), keeps

    def exp_target(self, t: Tensor, keep_t: bool) -> Tensor:
        """Where exp(t) goes: t itself, or the second buffer when the caller still needs t."""
        return self.pflat[: t.numel()].view(t.shape) if keep_t else t


def _row_dot(p: Tensor, t: Tensor) -> Tensor:
    """sum_j p_j t_j per row, (..., 1); overwrites t (vecdot would allocate a tile each call)."""
    return t.mul_(p).sum(dim=-1, keepdim=True)


def _bounded_rows(tiles: _Tiles, spans: list[Span], need_stats: bool):
    """One query block with p = exp(s) (see kernels/unshifted.py): no shift, nothing to rescale.

    Returns the shift 0, l = sum p, acc = sum p v, sum p s and max p (the last two: stats).
    """
    l_run = acc = ps = top = None
    # The bound covers allowed logits only; a masked one may be anything. Clamping the
    # masked ranges keeps its exp finite (inf * 0 would be NaN) before it is zeroed, and
    # the margin of 1 leaves every allowed logit untouched.
    edge = _BOUNDED_LOGIT_LIMIT[tiles.qb.dtype] + 1.0
    for ks, ke, partial in spans:
        s, keeps = tiles.logits(ks, ke, partial, mask_with_inf=False)
        for a, b, _ in keeps:
            s[..., a:b].clamp_(-edge, edge)
        p = tiles.blocks.apply_keeps(torch.exp(s, out=tiles.exp_target(s, need_stats)), keeps)
        # p @ v first, while p is still in the cache the exp just wrote it to.
        if l_run is None:
            acc, l_run = torch.bmm(p, tiles.v3[:, ks:ke]), p.sum(dim=-1, keepdim=True)
        else:
            acc.baddbmm_(p, tiles.v3[:, ks:ke])
            l_run.add_(p.sum(dim=-1, keepdim=True))
        if need_stats:  # masked entries have p = 0 and a finite s: they add nothing
            ps_tile, p_max = _row_dot(p, s), p.amax(dim=-1, keepdim=True)
            ps, top = (ps_tile, p_max) if ps is None else (ps.add_(ps_tile), torch.maximum(top, p_max, out=top))
    return 0.0, l_run, acc, ps, top


def _online_rows(tiles: _Tiles, spans: list[Span], need_stats: bool, fixed: Tensor | None = None):
    """One query block with a running row maximum m, rescaling l and acc when it grows.

    ``fixed`` (rows, 1) marks rows whose shift stays 0 (see kernels/unshifted.py): for them
    alpha is exp(0) = 1 and t = s, so they get exactly the arithmetic of _bounded_rows.
    Returns m, l = sum exp(s - m), acc, sum p (s - m) and the largest p (1 for shifted rows).
    """
    neg_inf = float("-inf")
    m_run = l_run = acc = ps = p_top = None
    for ks, ke, partial in spans:
        s, keeps = tiles.logits(ks, ke, partial, mask_with_inf=True)
        m_tile = s.amax(dim=-1, keepdim=True)
        m_new = m_tile if m_run is None else torch.maximum(m_run, m_tile)
        if fixed is not None:
            m_new = m_new.masked_fill(fixed, 0.0)
        # A row that has seen only masked keys keeps m = -inf; shift it by 0 instead.
        m_safe = torch.where(m_new == neg_inf, 0.0, m_new) if partial else m_new
        t = s.sub_(m_safe)
        # Stats: sum p (s - m) = sum p t needs t after the exp: a row dot product (a log,
        # as in p log p, costs 10x more), rescaled to the new max like the output.
        # Elementwise, so no cancellation.
        p = tiles.blocks.probabilities(t, keeps, out=tiles.exp_target(t, need_stats))
        if need_stats and fixed is not None:  # the largest p of the unshifted rows
            p_max = p.amax(dim=-1, keepdim=True)
            p_top = p_max if p_top is None else torch.maximum(p_top, p_max, out=p_top)
        if m_run is None:  # first tile of the row block: nothing to rescale
            acc, l_run = torch.bmm(p, tiles.v3[:, ks:ke]), p.sum(dim=-1, keepdim=True)
            ps = _row_dot(p, t) if need_stats else None
        else:
            alpha = torch.exp(m_run - m_safe)
            acc.mul_(alpha).baddbmm_(p, tiles.v3[:, ks:ke])  # p @ v while p is in the cache
            if need_stats:
                shift = torch.where(l_run > 0, (m_run - m_safe) * l_run, 0.0)
                ps.add_(shift).mul_(alpha).add_(_row_dot(p, t))
            l_run.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
        m_run = m_new
    top = 1.0 if p_top is None else torch.where(fixed, p_top, 1.0)
    return m_run, l_run, acc, ps, top


def _tiled_backward(plan, q, k, v, out, lse, dout, params, stats: StatsGrad | None = None, dlse=None):
    B, Hq, Hkv, L, S, G = plan.B, plan.Hq, plan.Hkv, plan.L, plan.S, plan.G
    E, Ev = q.shape[-1], v.shape[-1]
    blocks = _Blocks(plan, q.device)
    q5, do5 = _scaled_queries(plan, q).view(B, Hkv, G, L, E), dout.view(B, Hkv, G, L, Ev)
    # Rows with nothing to attend to have lse = -inf; +inf makes their probabilities 0.
    lse5 = torch.where(lse == float("-inf"), float("inf"), lse).view(B, Hkv, G, L)
    delta5 = row_delta(dout, out, lse, dlse).view(B, Hkv, G, L)  # the lse's gradient rides in it
    dq = torch.zeros_like(q5)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dparams = [torch.zeros_like(p) for p in params]  # p may need grad: zeros_like does not
    generic = plan.score is not None
    for iq, visits in enumerate(plan.visits):
        if not visits:
            continue
        qs = iq * plan.block_q
        n = min(plan.block_q, L - qs)
        qb = q5[:, :, :, qs : qs + n].reshape(B, Hkv, G * n, E)
        dob = do5[:, :, :, qs : qs + n].reshape(B, Hkv, G * n, Ev)
        lse_b = lse5[:, :, :, qs : qs + n].reshape(B, Hkv, G * n, 1)
        delta_b = delta5[:, :, :, qs : qs + n].reshape(B, Hkv, G * n, 1)
        dqb = torch.zeros_like(qb)
        sg = stats.block(blocks, qb, k, qs, n, visits) if stats is not None else None
        for jk, partial in visits:
            ks = jk * plan.block_k
            ke = min(S, ks + plan.block_k)
            kb, vb = k[:, :, ks:ke], v[:, :, ks:ke]
            ranges = ((0, ke - ks),) if partial else ()
            if generic:
                with torch.enable_grad():
                    qg, kg = qb.detach().requires_grad_(), kb.detach().requires_grad_()
                    s, keeps = blocks.logits(qg, kg, qs, ks, ranges)
                if sg is not None:
                    sg.see(s.detach())
                t = s.detach() - lse_b
                p = blocks.probabilities(t, keeps)
            else:
                s, keeps = blocks.logits(qb, kb, qs, ks, ranges, inplace=True)
                if sg is not None:
                    sg.see(s)
                t = s.sub_(lse_b)  # the statistics' gradients need t = log p after the exp
                p = blocks.probabilities(t, keeps, out=s if sg is None else None)
            dv[:, :, ks:ke] += torch.matmul(p.transpose(-1, -2), dob)
            ds = torch.matmul(dob, vb.transpose(-1, -2)).sub_(delta_b).mul_(p)
            if sg is not None:
                sg.add(ds, p, t)
            if generic:
                grads = torch.autograd.grad(s, (qg, kg, *params), ds, allow_unused=True)
                dqb += grads[0]
                dk[:, :, ks:ke] += grads[1]
                for acc, g in zip(dparams, grads[2:]):
                    if g is not None:
                        acc += g
            else:
                # qb already carries the scale (see _scaled_queries): dk needs no extra factor.
                dqb += torch.matmul(ds, kb).mul_(plan.scale)
                dk[:, :, ks:ke] += torch.matmul(ds.transpose(-1, -2), qb)
        dq[:, :, :, qs : qs + n] = dqb.view(B, Hkv, G, n, E)
    return dq.view(B, Hq, L, E), dk, dv, dparams


class _TiledFunction(torch.autograd.Function):
    """Forward and recomputing backward. ``params`` are the score's tensors that need grad.

    They are passed to ``apply`` so that autograd routes their gradients. The backward
    recomputes the logits with detached copies of them (``Score.with_parameters``): a
    parameter may be computed from another outside the kernel (a per-key bias from v and
    the curvature), and the kernel must return partial derivatives, not run that outer
    graph itself.
    """

    @staticmethod
    def forward(ctx, plan: TiledPlan, need_stats: bool, q: Tensor, k: Tensor, v: Tensor, *params: Tensor):
        out, lse, entropy, max_w = _tiled_forward(plan, q, k, v, need_stats)
        ctx.plan = plan
        empty = q.new_zeros(0)
        ent = empty if entropy is None else entropy.view(lse.shape)
        mw = empty if max_w is None else max_w.view(lse.shape)
        ctx.save_for_backward(q, k, v, out, lse, ent, mw)
        # lse and the statistics are differentiable (kernels/tiled_stats.py); unused outputs
        # get None, not zeros, so a loss without them costs the backward nothing extra.
        ctx.mark_non_differentiable(*(() if need_stats else (ent, mw)))
        ctx.set_materialize_grads(False)
        return out, lse, ent, mw

    @staticmethod
    def backward(ctx, dout, dlse, dent, dmw):
        q, k, v, out, lse, ent, mw = ctx.saved_tensors
        plan = ctx.plan
        params = ()
        if plan.score is not None and plan.score.parameters():
            params = tuple(p.detach().requires_grad_() for p in plan.score.parameters())
            plan = replace(plan, score=plan.score.with_parameters(params))
        stats = None if dent is None and dmw is None else StatsGrad(plan, ent, dent, mw, dmw)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()  # a loss of lse or stats alone
        dq, dk, dv, dparams = _tiled_backward(plan, q, k, v, out, lse, dout, params, stats, dlse)
        return (None, None, dq, dk, dv, *dparams)


def tiled_attention(
    req: Request, block_q: int | None = None, block_k: int | None = None, span_keys: int | None = None
) -> AttentionOutput:
    """Run the tiled kernel on a request (see the module docstring and :func:`make_plan`)."""
    plan = make_plan(req, block_q, block_k, span_keys)
    q, k, v = req.q, req.k, req.v
    in_dtype = q.dtype
    if in_dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if req.score is not None:
        q, k = req.score.prepare(q, k)
    params = req.score.parameters() if req.score is not None else ()
    out, lse, ent, mw = _TiledFunction.apply(
        plan, req.need_stats, q.contiguous(), k.contiguous(), v.contiguous(), *params
    )
    stats = AttentionStats(entropy=ent, max_weight=mw) if req.need_stats else None
    return AttentionOutput(out=out.to(in_dtype), weights=None, stats=stats, lse=lse, backend="tiled")


class TiledBackend(Backend):
    name = "tiled"
    summary = "online softmax over blocks; skips empty blocks; streaming stats; recomputing backward"
    capabilities = {
        "masks": "all (empty blocks skipped, full blocks unmasked)",
        "scores": "all",
        "GQA/MQA": "yes (no copy)",
        "need_weights": "no",
        "need_stats": "yes (streaming, no L x S tensor)",
        "lse": "yes",
        "dropout": "no",
        "backward": "yes (FlashAttention-2 recomputation)",
        "devices": "any",
    }

    def refusals(self, req: Request) -> list[str]:
        reasons = []
        if req.need_weights:
            reasons.append("tiled never materialises the L x S weights (need_weights=True)")
        if req.dropout_p > 0:
            reasons.append("tiled does not implement dropout (dropout_p > 0)")
        return reasons

    def memory_bytes(self, req: Request) -> int:  # block scores (<= 256 x 256 per batch and head), row statistics
        B, Hq, _, L, S, _, _ = req.shape
        return 4 * B * Hq * (min(L, 256) * min(S, 256) * 3 + L * 4)

    def cost(self, req: Request) -> float:
        return estimate_seconds(req)

    def run(self, req: Request) -> AttentionOutput:
        return tiled_attention(req)
