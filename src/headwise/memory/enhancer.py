"""Learned query enhancers for the vector memory: a linear adapter and multi-head attention stages.

Every enhancer maps a query embedding to a refined, L2-normalised query for a *second* search
pass over the whole store (so it can raise recall@K, which a reranker of the first top-K
cannot). The store calls ``refine(queries, cand_vectors, cand_scores)`` after a first search of
``candidates`` (K) neighbours:

- :class:`LinearAdapter`: ``q + W q`` (W starts at 0: the identity), candidates unused.
- :class:`QueryEnhancer` with ``mechanism=``

  - ``"multi-head"``: the adapted query attends to its K candidates with
    :class:`~headwise.modules.MultiHeadAttention` (cross attention, 8 heads by default); each
    candidate token is its embedding plus a learned rank embedding and a projection of its score
    features (score, gap to the top score);
  - ``"hyperbolic"`` / ``"moe"``: the same tokens, [query; candidates], through
    :class:`~headwise.modules.HyperbolicAttention` or :class:`~headwise.modules.MoEAttention`
    (self attention; the query position's output is read);
  - ``"flash"``: a soft read-out of the whole memory: every stored vector is a key and a value,
    split into heads, and :func:`headwise.attend` streams over all N of them with the tiled
    kernel (never an (n, N) matrix). Bind the memory with :meth:`QueryEnhancer.bind`: an array,
    or a store whose records it then follows as they are added and deleted.

  The attention read-out ``o`` enters through a zero-initialised projection:
  ``refined = normalize(q + W q + M o)``, so an untrained enhancer is exactly cosine kNN.

Shape legend: queries (n, d), cand_vectors (n, K, d), cand_scores (n, K), memory (N, d);
refined queries (n, d). All float32.

Weights are saved as safetensors with the config as JSON next to them (atomic writes, no pickle).

Example:
    >>> import torch
    >>> enh = QueryEnhancer(32, heads=4, candidates=5)
    >>> q = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    >>> cands = torch.nn.functional.normalize(torch.randn(3, 5, 32), dim=-1)
    >>> out = enh(q, cands, torch.rand(3, 5))
    >>> out.shape, bool(torch.allclose(out, q, atol=1e-6))   # identity at initialisation
    (torch.Size([3, 32]), True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from headwise.attend import attend
from headwise.errors import HeadwiseError, bad_argument
from headwise.memory.binding import StoreBinding, is_store
from headwise.memory.checks import MAX_K
from headwise.memory.serving import LinearPlan, MultiHeadPlan
from headwise.modules import HyperbolicAttention, MoEAttention, MultiHeadAttention

MECHANISMS = ("multi-head", "hyperbolic", "moe", "flash")
FIRST_PASSES = ("raw", "adapted")
WEIGHTS_FILE, CONFIG_FILE = "enhancer.safetensors", "enhancer.json"


def _as_array(x: Any, name: str, dims: int, dim: int, finite: bool = True) -> np.ndarray:
    """C-contiguous float32 array of ``dims`` dimensions whose last one is ``dim`` (when dim > 0), finite.

    Checked in numpy: on the small arrays of one query a numpy check costs a few µs, torch's
    isfinite + all several times that.
    """
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != dims or (dim > 0 and a.shape[-1] != dim):
        raise bad_argument(name, f"a {dims}-d array with last dimension {dim}", a.shape)
    # min and max propagate NaN and expose +-Inf: two reductions, no (n, K, d) bool temporary.
    if finite and a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
        raise bad_argument(name, "finite values", "NaN or Inf")
    return a


def _as_tensor(a: np.ndarray) -> Tensor:
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # torch warns on read-only memory


class _Enhancer(nn.Module):
    """Shared protocol: ``candidates``, ``refine`` (numpy in, numpy out), ``config``, save/load."""

    candidates: int
    #: False when refine() ignores the candidates (linear, flash): they still ask the store for
    #: K = 1, the store's minimum, so the first pass costs one neighbour.
    uses_candidates: bool = True
    _plan: LinearPlan | MultiHeadPlan | None = None
    _plan_key: tuple | None = None

    def config(self) -> dict[str, Any]:
        raise NotImplementedError  # each subclass returns its constructor arguments

    def serving_plan(self) -> LinearPlan | MultiHeadPlan | None:
        """The folded numpy plan that :meth:`refine` runs in eval mode (None: refine runs torch).

        Rebuilt when a parameter it reads changes: the cache key holds each such tensor's
        identity, storage address (``module.to`` swaps ``p.data``) and version counter, which
        torch bumps on every in-place update (optimizer steps, ``load_state_dict``, ``p.copy_``).
        """
        if not self._has_plan():
            return None
        try:
            key = self._plan_sources_key()
        except RuntimeError:  # an inference tensor keeps no version counter: fold every time
            return self._fold()
        if self._plan_key != key:
            self._plan, self._plan_key = self._fold(), key
        return self._plan

    def _eval_plan(self) -> LinearPlan | MultiHeadPlan | None:
        """The serving plan in eval mode; None in training mode (dropout) or without a plan."""
        return None if self.training else self.serving_plan()

    def _plan_sources_key(self) -> tuple:
        """(id, data_ptr, version) of every parameter (a plan reads them all), in one walk.

        Walked through the modules' own dicts: on a served query this runs once per search,
        where nn.Module attribute lookups and the ``parameters()`` generator cost several times
        more. Raises RuntimeError for an inference tensor (its ``_version``).
        """
        key: list[tuple[int, int, int]] = []
        stack: list[nn.Module] = [self]
        while stack:
            module = stack.pop()
            key += [(id(p), p.data_ptr(), p._version) for p in module._parameters.values() if p is not None]
            stack += [m for m in module._modules.values() if m is not None]
        return tuple(key)

    def _has_plan(self) -> bool:
        return False

    def _fold(self) -> LinearPlan | MultiHeadPlan | None:
        return None

    def refine(self, queries: Any, cand_vectors: Any = None, cand_scores: Any = None) -> np.ndarray:
        """Refined queries (n, d) float32 for a second search pass (the store's protocol).

        In eval mode it runs :meth:`serving_plan` when the mechanism has one (the same
        function as ``forward`` in a few array operations, see :mod:`headwise.memory.serving`);
        in training mode, or for the other mechanisms, the module's forward in eval mode.
        NaN or Inf in any input raises a HeadwiseError naming it.
        """
        plan = self._eval_plan()
        if plan is None:
            return self._refine_torch(*self._checked(queries, cand_vectors, cand_scores, finite=True))
        q, c, s = self._checked(queries, cand_vectors, cand_scores, finite=False)
        out = plan.refine(q, c, s).astype(np.float32, copy=False)
        # NaN and Inf propagate through every product (0 * NaN is NaN): a finite output proves
        # finite inputs, so the inputs are only scanned, to name the culprit, when it is not.
        if not np.isfinite(out).all():
            self._checked(queries, cand_vectors, cand_scores, finite=True)
            raise HeadwiseError("refine: expected a finite output from finite inputs, got NaN or Inf")
        return out

    def refine_unchecked(self, *arrays: np.ndarray) -> np.ndarray:
        """:meth:`refine` of arrays that a :class:`~headwise.memory.store.VectorMemory` made, without the checks.

        ``arrays``: queries (n, d), and for enhancers that use candidates their vectors (n, K, d)
        and scores (n, K), K <= ``candidates``: float32, C-contiguous, finite. Neither these nor
        the output are checked (the store checks the output): on a served query the checks
        cost a third of what the folded read-out does. In training mode, or without a plan,
        it is :meth:`refine`.
        """
        plan = self._eval_plan()
        return self.refine(*arrays) if plan is None else plan.refine(*arrays)

    def _checked(
        self, queries: Any, cand_vectors: Any, cand_scores: Any, *, finite: bool
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        q = _as_array(queries, "queries", 2, self.dim, finite)
        if not self.uses_candidates:
            return q, None, None
        c = _as_array(cand_vectors, "cand_vectors", 3, self.dim, finite)
        s = _as_array(cand_scores, "cand_scores", 2, 0, finite)
        if c.shape[0] != q.shape[0] or s.shape != c.shape[:2]:
            raise bad_argument(
                "cand_vectors, cand_scores",
                f"shapes ({q.shape[0]}, K, {self.dim}) and ({q.shape[0]}, K)",
                f"{c.shape} and {s.shape}",
            )
        if c.shape[1] > self.candidates:
            raise bad_argument("cand_vectors", f"at most K={self.candidates} candidates", c.shape[1])
        return q, c, s

    @torch.no_grad()
    def _refine_torch(self, q: np.ndarray, c: np.ndarray | None, s: np.ndarray | None) -> np.ndarray:
        was = self.training
        if was:  # module.train() walks every submodule: skip it when already in eval mode
            self.eval()
        try:
            args = (_as_tensor(q),) if c is None else (_as_tensor(q), _as_tensor(c), _as_tensor(s))
            out = self(*args)
        finally:
            if was:
                self.train(True)
        return out.float().numpy()

    def save(self, directory: Path | str) -> Path:
        """Write ``enhancer.safetensors`` and ``enhancer.json`` into ``directory`` atomically."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        tmp_w, tmp_c = d / f".{WEIGHTS_FILE}.tmp", d / f".{CONFIG_FILE}.tmp"
        save_file(tensors, str(tmp_w))
        tmp_c.write_text(json.dumps({"class": type(self).__name__, **self.config()}, indent=2))
        # Weights first, config last: a config on disk always names weights that are complete.
        os.replace(tmp_w, d / WEIGHTS_FILE)
        os.replace(tmp_c, d / CONFIG_FILE)
        return d / WEIGHTS_FILE


class LinearAdapter(_Enhancer):
    """``normalize(q + W q + b)`` with W, b initialised to 0: a learned linear query map.

    It ignores candidates: ``candidates`` is 1, the least a store asks for.

    Example:
        >>> import torch
        >>> ad = LinearAdapter(8)
        >>> q = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
        >>> bool(torch.allclose(ad(q), q))
        True
    """

    def __init__(self, dim: int):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise bad_argument("dim", "an integer >= 1", repr(dim))
        self.dim, self.candidates, self.uses_candidates = dim, 1, False
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def _has_plan(self) -> bool:
        return True

    def _fold(self) -> LinearPlan:
        return LinearPlan.from_adapter(self)

    def forward(self, q: Tensor, cand: Tensor | None = None, scores: Tensor | None = None) -> Tensor:
        """q (n, d) -> (n, d); candidates are ignored."""
        return F.normalize(q + self.linear(q), dim=-1)


class QueryEnhancer(_Enhancer):
    """Residual query adapter plus a multi-head attention read-out (see the module docstring).

    Args:
        dim: embedding dimension d.
        mechanism: "multi-head", "hyperbolic", "moe" or "flash".
        heads: attention heads per layer (MoE: experts x heads_per_expert = heads).
        candidates: K, the first-pass neighbours the store hands to :meth:`refine` (flash: 1, unused).
        dropout: dropout on candidate tokens (and inside the feed-forward blocks) while training.
        layers: attention layers. "multi-head": the query attends its candidates ``layers``
            times (cross attention, the candidate tokens fixed); "hyperbolic" / "moe": self
            attention over [query; candidates], residual between layers. The read-out ``o`` is
            the sum of every layer's update of the query position.
        hidden: width of a pre-norm feed-forward block after each attention layer (0: none).
            Only layers=1, hidden=0 folds into the fast serving plan; the others run torch.
        experts, experts_per_token, capacity_factor, aux_weight: MoE options (experts default:
            4 when they divide heads, else 1; aux_weight scales the load-balancing loss in training).
        curvature, clip: hyperbolic options (the initial, learned, curvature and the tangent clip).
        first_pass: what the store's first pass searches with (:meth:`first_pass_queries`):
            "raw", the query itself, or "adapted", ``normalize(q + A q + a)`` with this
            enhancer's adapter. With "adapted" the adapter is meant to be trained first (a
            :class:`LinearAdapter`, see :meth:`adopt_adapter`) and frozen, so that the
            candidates the read-out is trained on are the ones it is served.
    """

    def __init__(
        self,
        dim: int,
        *,
        mechanism: str = "multi-head",
        heads: int = 8,
        candidates: int = 32,
        dropout: float = 0.0,
        first_pass: str = "raw",
        layers: int = 1,
        hidden: int = 0,
        experts: int | None = None,
        experts_per_token: int = 1,
        capacity_factor: float = 1.25,
        aux_weight: float = 0.01,
        curvature: float = 1.0,
        clip: float = 4.0,
    ):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise bad_argument("dim", "an integer >= 1", repr(dim))
        if mechanism not in MECHANISMS:
            raise bad_argument("mechanism", f"one of {MECHANISMS}", repr(mechanism))
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
            raise bad_argument("heads", f"a positive divisor of dim ({dim})", repr(heads))
        if mechanism == "flash":
            candidates = 1
        elif isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_K:
            raise bad_argument("candidates", f"an integer in [1, {MAX_K}]", repr(candidates))
        if not 0 <= dropout < 1:
            raise bad_argument("dropout", "a number in [0, 1)", repr(dropout))
        if first_pass not in FIRST_PASSES or (first_pass != "raw" and mechanism == "flash"):
            allowed = ("raw",) if mechanism == "flash" else FIRST_PASSES
            raise bad_argument("first_pass", f"one of {allowed} for mechanism {mechanism!r}", repr(first_pass))
        self.dim, self.mechanism, self.heads, self.candidates, self.dropout = dim, mechanism, heads, candidates, dropout
        self.first_pass = first_pass
        self.options = _mechanism_options(
            mechanism, heads, layers=layers, hidden=hidden, experts=experts, experts_per_token=experts_per_token,
            capacity_factor=capacity_factor, aux_weight=aux_weight, curvature=curvature, clip=clip,
        )  # fmt: skip
        self.layers, self.hidden, self.aux_weight = layers, hidden, aux_weight
        self.uses_candidates = mechanism != "flash"
        self.adapter = nn.Linear(dim, dim)
        self.mix = nn.Linear(dim, dim)
        for lin in (self.adapter, self.mix):  # zero: the untrained enhancer is the identity
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self._memory: Tensor | None = None
        self._binding: StoreBinding | None = None
        if mechanism == "flash":
            self.q_proj = nn.Linear(dim, dim)
            nn.init.eye_(self.q_proj.weight)
            nn.init.zeros_(self.q_proj.bias)
            # Per-head inverse temperature, as a log: cosine scores in [-1, 1] need ~20x to be peaked.
            self.log_beta = nn.Parameter(torch.full((heads,), float(np.log(20.0))))
            return
        self.rank = nn.Parameter(torch.zeros(candidates, dim))
        self.score_feat = nn.Linear(2, dim)
        nn.init.normal_(self.score_feat.weight, std=0.02)
        nn.init.zeros_(self.score_feat.bias)
        # Layer 1 keeps the name ``attn`` (and layers=1, hidden=0 adds no parameter): weights
        # saved before layers existed load unchanged.
        self.attn: nn.Module = self._attention_layer()
        self.more_attn = nn.ModuleList(self._attention_layer() for _ in range(layers - 1))
        self.ffn = nn.ModuleList(FeedForward(dim, hidden, dropout) for _ in range(layers if hidden else 0))

    def _attention_layer(self) -> nn.Module:
        dim, heads, opt = self.dim, self.heads, self.options
        if self.mechanism == "multi-head":
            return MultiHeadAttention(dim, heads)
        if self.mechanism == "hyperbolic":
            return HyperbolicAttention(dim, heads, curvature=opt["curvature"], learn_curvature=True, clip=opt["clip"])
        experts = opt["experts"]
        return MoEAttention(
            dim,
            num_experts=experts,
            heads_per_expert=heads // experts,
            experts_per_token=opt["experts_per_token"],
            capacity_factor=opt["capacity_factor"],
        )

    def attention_layers(self) -> list[nn.Module]:
        """The attention modules, layer 1 first (empty for "flash")."""
        return [] if self.mechanism == "flash" else [self.attn, *self.more_attn]

    def config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "mechanism": self.mechanism,
            "heads": self.heads,
            "candidates": self.candidates,
            "dropout": self.dropout,
            "first_pass": self.first_pass,
            **self.options,
        }

    def first_pass_queries(self, queries: Any) -> np.ndarray:
        """The queries (n, d) float32 that the store's first pass searches with (see ``first_pass``)."""
        q = _as_array(queries, "queries", 2, self.dim)
        if self.first_pass == "raw":
            return q
        plan = self._eval_plan()
        if plan is not None:
            return plan.adapted(q).astype(np.float32, copy=False)
        with torch.no_grad():
            t = _as_tensor(q).to(self.adapter.weight.dtype)
            return F.normalize(t + self.adapter(t), dim=-1).float().numpy()

    def adopt_adapter(self, linear: LinearAdapter, *, freeze: bool = True) -> QueryEnhancer:
        """Copy a trained :class:`LinearAdapter` into this enhancer's adapter (frozen by default). Returns self.

        Untrained, the enhancer then returns exactly the linear adapter's queries (its read-out
        enters through a zero-initialised projection), so training the read-out on top can only
        add to what the adapter found.
        """
        if not isinstance(linear, LinearAdapter) or linear.dim != self.dim:
            raise bad_argument("linear", f"a LinearAdapter of dim {self.dim}", linear)
        with torch.no_grad():
            self.adapter.weight.copy_(linear.linear.weight)
            self.adapter.bias.copy_(linear.linear.bias)
        self.adapter.requires_grad_(not freeze)
        return self

    def adapter_only(self) -> LinearAdapter:
        """A :class:`LinearAdapter` holding a copy of this enhancer's adapter: the read-out ablated.

        Its queries are what this enhancer's would be with the read-out switched off, so
        evaluating both separates what the attention stage adds from what its adapter does.
        """
        linear = LinearAdapter(self.dim).to(self.adapter.weight)  # same dtype and device: an exact copy
        with torch.no_grad():
            linear.linear.weight.copy_(self.adapter.weight)
            linear.linear.bias.copy_(self.adapter.bias)
        return linear.eval()

    def _has_plan(self) -> bool:
        # The folded plan is one cross-attention layer without a feed-forward block.
        return self.mechanism == "multi-head" and self.layers == 1 and not self.hidden

    def _fold(self) -> MultiHeadPlan:
        return MultiHeadPlan.from_enhancer(self)  # serving_plan calls it only when _has_plan()

    @property
    def aux_loss(self) -> Tensor:
        """The MoE load-balancing loss of the last forward, summed over layers (0 for other mechanisms)."""
        if self.mechanism != "moe":
            return torch.zeros(())
        return sum((m.aux_loss for m in self.more_attn), self.attn.aux_loss)

    def bind(self, memory: Any) -> QueryEnhancer:
        """Set what the "flash" read-out attends over: (N, d) vectors, or a store to follow. Returns self.

        Bound to a :class:`~headwise.memory.store.VectorMemory`, the read-out attends over the
        store's live vectors as they are at each search: records added or deleted after the
        bind are seen (see :mod:`headwise.memory.binding`). Binding again to the same store
        keeps what was already fetched.
        """
        if self.mechanism != "flash":
            raise bad_argument("bind", "mechanism 'flash'", repr(self.mechanism))
        if is_store(memory):
            if getattr(memory, "dim", self.dim) != self.dim:
                raise bad_argument("memory", f"a store of dim {self.dim}", f"dim {memory.dim}")
            if self._binding is None or not self._binding.follows(memory):
                self._binding = StoreBinding(memory)
            self._memory = None
            return self
        self._memory = _as_tensor(_as_array(memory, "memory", 2, self.dim))
        self._binding = None
        return self

    def attach(self, memory: Any) -> None:
        """Called by a store that this enhancer is set on: a "flash" enhancer follows its records.

        The other mechanisms read their candidates from the search and ignore it.
        """
        if self.mechanism == "flash":
            self.bind(memory)

    def _bound_memory(self) -> Tensor:
        """The (N, d) vectors the flash read-out attends over now."""
        if self._binding is not None:
            return _as_tensor(self._binding.vectors())
        if self._memory is None:
            raise HeadwiseError(
                "flash: expected a memory bound with bind(vectors) or bind(store) (a VectorMemory to follow), got none"
            )
        return self._memory

    def tokens(self, cand: Tensor, scores: Tensor) -> Tensor:
        """Candidate tokens (n, K, d): embedding + rank embedding + projected score features."""
        K = cand.shape[1]
        if self.candidates < K:
            raise bad_argument("cand_vectors", f"at most K={self.candidates} candidates", K)
        feats = torch.stack([scores, scores[:, :1] - scores], dim=-1)  # (n, K, 2): score and gap to the top
        tok = cand + self.rank[:K] + self.score_feat(feats)
        return F.dropout(tok, self.dropout, self.training)

    def readout(self, qa: Tensor, cand: Tensor | None, scores: Tensor | None) -> Tensor:
        """The attention read-out o (n, d) for adapted queries qa (n, d)."""
        if self.mechanism == "flash":
            mem = self._bound_memory()
            # Queries as the L axis of one batch: q (1, H, n, dh) against k = v = memory (1, H, N, dh).
            qh = rearrange(self.q_proj(qa), "n (h e) -> 1 h n e", h=self.heads)
            qh = qh * self.log_beta.exp().view(1, -1, 1, 1)
            kv = rearrange(mem, "s (h e) -> 1 h s e", h=self.heads)
            o = attend(qh, kv, kv, scale=1.0, backend="tiled", check_finite=False).out
            return rearrange(o, "1 h n e -> n (h e)")
        if cand is None or scores is None:
            raise bad_argument("cand_vectors", f"(n, K, {self.dim}) candidates for {self.mechanism!r}", None)
        tok = self.tokens(cand, scores)
        # o is the sum of every layer's update of the query position; with one layer and no
        # feed-forward block it is exactly that layer's output (0 + a is a, bitwise).
        o: Tensor | None = None
        if self.mechanism == "multi-head":  # cross attention: the candidate tokens stay fixed
            h = qa
            for i, attn in enumerate(self.attention_layers()):
                if not torch.is_grad_enabled():  # serving: the same read-out, tokens never projected
                    a = attn.folded_cross_attention(h, tok)
                else:
                    a = attn(h.unsqueeze(1), tok, tok).out[:, 0]
                o = a if o is None else o + a
                if self.ffn:
                    o = o + self.ffn[i](qa + o)
                h = qa + o
            return o
        x = torch.cat([qa.unsqueeze(1), tok], dim=1)  # self attention over [query; candidates]
        for i, attn in enumerate(self.attention_layers()):
            y = attn(x)
            o, x = (y[:, 0] if o is None else o + y[:, 0]), x + y
            if self.ffn:
                f = self.ffn[i](x)
                o, x = o + f[:, 0], x + f
        return o

    def forward(self, q: Tensor, cand: Tensor | None = None, scores: Tensor | None = None) -> Tensor:
        """q (n, d), cand (n, K, d), scores (n, K) -> refined queries (n, d), L2-normalised."""
        qa = q + self.adapter(q)
        return F.normalize(qa + self.mix(self.readout(qa, cand, scores)), dim=-1)


class FeedForward(nn.Module):
    """Pre-norm feed-forward update ``W2 dropout(gelu(W1 LayerNorm(x)))`` (d -> hidden -> d), x (..., d)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.dropout(F.gelu(self.up(self.norm(x))), self.dropout, self.training))


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_argument(name, "an integer >= 1", repr(value))
    return value


def _mechanism_options(mechanism: str, heads: int, **opt: Any) -> dict[str, Any]:
    """The checked layer and mechanism options (MoE experts default: 4 when they divide heads, else 1)."""
    _positive_int(opt["layers"], "layers")
    if isinstance(opt["hidden"], bool) or not isinstance(opt["hidden"], int) or opt["hidden"] < 0:
        raise bad_argument("hidden", "an integer >= 0 (0: no feed-forward block)", repr(opt["hidden"]))
    if mechanism == "flash" and (opt["layers"] != 1 or opt["hidden"]):
        raise bad_argument("layers, hidden", "1 and 0 for mechanism 'flash'", (opt["layers"], opt["hidden"]))
    if opt["experts"] is None:
        opt["experts"] = 4 if heads % 4 == 0 else 1
    if _positive_int(opt["experts"], "experts") and heads % opt["experts"]:
        raise bad_argument("experts", f"a divisor of heads ({heads})", opt["experts"])
    if not 1 <= _positive_int(opt["experts_per_token"], "experts_per_token") <= opt["experts"]:
        raise bad_argument("experts_per_token", f"at most experts ({opt['experts']})", opt["experts_per_token"])
    for name in ("capacity_factor", "curvature", "clip"):
        if not isinstance(opt[name], int | float) or not 0 < opt[name] < float("inf"):
            raise bad_argument(name, "a finite number > 0", repr(opt[name]))
    if not isinstance(opt["aux_weight"], int | float) or not 0 <= opt["aux_weight"] < float("inf"):
        raise bad_argument("aux_weight", "a finite number >= 0", repr(opt["aux_weight"]))
    return opt


def _from_config(cfg: dict) -> _Enhancer:
    """An untrained enhancer built from a saved config (a gated one wraps its inner config)."""
    name = cfg.pop("class")
    if name == "GatedEnhancer":
        from headwise.memory.gate import GatedEnhancer

        fallback = cfg.pop("fallback", None)
        fallback = _from_config(dict(fallback)) if fallback is not None else None
        return GatedEnhancer(_from_config(dict(cfg.pop("inner"))), fallback=fallback, **cfg)
    return {"LinearAdapter": LinearAdapter, "QueryEnhancer": QueryEnhancer}[name](**cfg)


def load_enhancer(directory: Path | str) -> _Enhancer:
    """Load an enhancer saved with ``save(directory)`` (safetensors + JSON; nothing is unpickled)."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise bad_argument("directory", f"a folder with {CONFIG_FILE} and {WEIGHTS_FILE}", str(d))
    try:
        cfg = json.loads(cfg_path.read_text())
        model = _from_config(cfg)
        model.load_state_dict(load_file(str(w_path)))
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        if isinstance(exc, HeadwiseError):
            raise
        got = f"{type(exc).__name__}: {exc}"
        raise bad_argument(str(cfg_path), "an enhancer config and matching weights", got) from exc
    model.eval()
    return model
