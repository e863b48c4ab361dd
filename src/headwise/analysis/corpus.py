"""Analyse every head of a transformers encoder over a corpus of texts, batch by batch.

Per head (mean over the real query rows of every text): entropy (plain and Clark-smoothed),
normalised entropy, Gini, sparsity, max weight, mean distance, mass on [CLS] and on [SEP];
its Kovaleva pattern type (from the corpus-mean vertical and diagonal masses); the head x
head Jensen-Shannon and cosine matrices over all selected heads; where the [CLS] row of
each layer attends; and, optionally, gradient importance with a label-free loss (see
:func:`self_contrast_loss`). With ``stats_only`` the weights are never stored: entropy,
normalised entropy and max weight come from the streaming statistics of ``attend``.

Shape legend: K selected heads (layers x heads, layer-major); matrices (K, K); per-head
metrics (n_layers_selected, n_heads_selected).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from headwise.analysis import metrics as M
from headwise.analysis.cache import AttentionCache
from headwise.analysis.hf import run_cached
from headwise.analysis.importance import Importance, gradient_importance, importance_from_total
from headwise.errors import bad_argument
from headwise.pretrained import length_order

TAU = 0.05  # temperature of the contrastive importance loss (as sentence-embedding training uses)
WEIGHT_METRICS = (
    "entropy",
    "entropy_smoothed",
    "normalized_entropy",
    "gini",
    "sparsity",
    "max_weight",
    "mean_distance",
    "to_cls",
    "to_sep",
    "vertical",
    "diagonal",
)
STATS_METRICS = ("entropy", "normalized_entropy", "max_weight")


@dataclass
class CorpusAnalysis:
    """What :func:`analyze_texts` found (see the module docstring)."""

    layers: list[int]
    heads: list[int]
    metrics: dict[str, Tensor]
    patterns: list[list[str]] | None = None
    js: Tensor | None = None
    cosine: Tensor | None = None
    cls_targets: dict[int, dict[str, float]] = field(default_factory=dict)
    importance: Importance | None = None
    example_tokens: list[str] = field(default_factory=list)
    example_weights: dict[int, Tensor] = field(default_factory=dict)
    n_texts: int = 0
    n_tokens: int = 0
    n_rows: int = 0

    @property
    def head_names(self) -> list[str]:
        return [f"L{lay}H{h}" for lay in self.layers for h in self.heads]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: per-head metrics, patterns, matrices, [CLS] targets, importance."""
        out: dict[str, Any] = {
            "n_texts": self.n_texts,
            "n_tokens": self.n_tokens,
            "layers": self.layers,
            "heads": self.heads,
            "per_head": [],
            "cls_targets": {str(k): v for k, v in self.cls_targets.items()},
        }
        for i, lay in enumerate(self.layers):
            for j, h in enumerate(self.heads):
                row: dict[str, Any] = {"layer": lay, "head": h}
                row.update({name: float(t[i, j]) for name, t in self.metrics.items()})
                if self.patterns is not None:
                    row["pattern"] = self.patterns[i][j]
                if self.importance is not None:
                    row["importance"] = float(self.importance.normalized[lay, h])
                    row["importance_raw"] = float(self.importance.raw[lay, h])
                out["per_head"].append(row)
        if self.js is not None and self.cosine is not None:
            names = self.head_names
            out["diversity"] = M.diversity_summary(self.js, self.cosine, names)
            out["js_per_row"] = self.js.tolist()
            out["js_summed_over_rows"] = (self.js * self.n_rows).tolist()
            out["cosine"] = self.cosine.tolist()
        return out


def self_contrast_loss(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Label-free loss: each text's embedding must pick out its own unpruned embedding.

    ``batch`` holds the tokenizer output and ``"reference"`` (B, D), the intact model's
    normalised embeddings; loss = cross-entropy of ``e_i . ref_j / TAU`` with target i.
    Unlike ``1 - cos(e, ref)``, whose gradient vanishes at the intact model, it has a
    non-zero gradient there, which is what Michel et al.'s score needs.
    """
    from headwise.pretrained import mean_pool

    inputs = {k: v for k, v in batch.items() if k != "reference"}
    emb = mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
    logits = emb @ batch["reference"].T / TAU
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))


@dataclass(frozen=True)
class AnalysisPlan:
    """What every batch of one analysis needs: the same for the in-process and the Ray engine.

    ``importance`` is already False for a corpus of one text (the loss contrasts texts).
    ``to_dict`` / ``from_dict`` carry a plan to another process as plain JSON values.
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    stats_only: bool = False
    importance: bool = True
    max_length: int = 128

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "heads": list(self.heads), "stats_only": self.stats_only,
                "importance": self.importance, "max_length": self.max_length}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisPlan:
        return cls(tuple(data["layers"]), tuple(data["heads"]), bool(data["stats_only"]), bool(data["importance"]),
                   int(data["max_length"]))  # fmt: skip

    @property
    def metric_names(self) -> tuple[str, ...]:
        return STATS_METRICS if self.stats_only else WEIGHT_METRICS


def plan_analysis(
    texts: Sequence[str],
    config: Any,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    stats_only: bool = False,
    importance: bool = True,
    batch_size: int = 32,
    max_length: int = 128,
) -> tuple[AnalysisPlan, list[list[int]]]:
    """The checked plan and the batches (lists of text indices, shortest texts first).

    ``config`` is the model's transformers config (``num_hidden_layers``, ``num_attention_heads``).

    Example:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(num_hidden_layers=6, num_attention_heads=12)
        >>> plan, batches = plan_analysis(["a long text", "short", "mid one"], cfg, layers=[5, 0], batch_size=2)
        >>> plan.layers, len(plan.heads), batches
        ((0, 5), 12, [[1, 2], [0]])
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise bad_argument("texts", "a non-empty sequence of strings", repr(texts)[:60])
    if batch_size < 1:
        raise bad_argument("batch_size", "an integer >= 1", batch_size)
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    for name, sel, top in (("layers", layers, n_layers), ("heads", heads, n_heads)):
        if sel is not None and any(not 0 <= int(i) < top for i in sel):
            raise bad_argument(name, f"indices in [0, {top})", list(sel))
    plan = AnalysisPlan(
        tuple(sorted({int(i) for i in layers})) if layers is not None else tuple(range(n_layers)),
        tuple(sorted({int(i) for i in heads})) if heads is not None else tuple(range(n_heads)),
        stats_only,
        importance and len(texts) > 1,
        max_length,
    )
    order = length_order(texts)  # less padding per batch
    return plan, [order[start : start + batch_size] for start in range(0, len(texts), batch_size)]


@dataclass
class BatchPartial:
    """The sums one batch adds to an analysis; :func:`combine` adds them up in batch order.

    Shapes (Ls, Hs: selected layers and heads, K = Ls * Hs): ``sums[name]`` (Ls, Hs) float64
    (per-head metric summed over the batch's real query rows); ``js_sum``, ``dots`` (K, K)
    float64; ``cls_sum`` (Ls, 3) float64; ``grad_abs`` (num_layers, H) float64, |dL/dg| of
    the batch, or None; ``example_weights[layer]`` (Hs, m, m) of the first text of batch 0.
    ``to_bytes`` / ``from_bytes`` move it between processes as an ``.npz`` (no pickle).
    """

    sums: dict[str, Tensor]
    n_texts: int
    n_tokens: int
    js_sum: Tensor | None = None
    dots: Tensor | None = None
    cls_sum: Tensor | None = None
    grad_abs: Tensor | None = None
    example_tokens: list[str] = field(default_factory=list)
    example_weights: dict[int, Tensor] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {f"sum.{k}": v.numpy() for k, v in self.sums.items()}
        for name in ("js_sum", "dots", "cls_sum", "grad_abs"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name).numpy()
        arrays.update({f"example.{lay}": w.numpy() for lay, w in self.example_weights.items()})
        meta = {"n_texts": self.n_texts, "n_tokens": self.n_tokens, "example_tokens": self.example_tokens}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> BatchPartial:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(z[k].copy()) for k in z.files if k != "meta"}
            meta = json.loads(bytes(z["meta"]).decode())
        return cls(
            sums={k.removeprefix("sum."): v for k, v in arrays.items() if k.startswith("sum.")},
            n_texts=meta["n_texts"],
            n_tokens=meta["n_tokens"],
            js_sum=arrays.get("js_sum"),
            dots=arrays.get("dots"),
            cls_sum=arrays.get("cls_sum"),
            grad_abs=arrays.get("grad_abs"),
            example_tokens=meta["example_tokens"],
            example_weights={int(k.split(".")[1]): v for k, v in arrays.items() if k.startswith("example.")},
        )


def analyze_batch(
    chunk: Sequence[str], tokenizer: Any, model: Any, plan: AnalysisPlan, *, example: bool = False
) -> BatchPartial:
    """Analyse one batch of texts (a model loaded with ``attn_implementation="headwise"``).

    ``example`` keeps the first text's tokens and weights (the figures draw them): the
    engines pass it for batch 0 only.
    """
    lay_sel, head_sel = list(plan.layers), list(plan.heads)
    cache = AttentionCache(lay_sel, head_sel, mode="stats" if plan.stats_only else "weights")
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    batch = tokenizer(list(chunk), padding=True, truncation=True, max_length=plan.max_length, return_tensors="pt")
    with torch.no_grad():
        out = run_cached(model, dict(batch), cache)
    tm = batch["attention_mask"].bool()  # (B, L) real tokens
    n = tm.sum(1)
    part = BatchPartial({}, n_texts=len(chunk), n_tokens=int(n.sum()))
    rows = tm.unsqueeze(1).double()  # (B, 1, L) weights of each query row in the means
    per_layer: dict[str, list[Tensor]] = {name: [] for name in plan.metric_names}
    cls_rows = []
    for lay in lay_sel:
        if plan.stats_only:
            ent = torch.stack([cache[lay, h].entropy for h in head_sel], 1).double()
            mx = torch.stack([cache[lay, h].max_weight for h in head_sel], 1).double()
            log_n = n.double().log().clamp_min(1e-30).view(-1, 1, 1)
            per_row = {"entropy": ent, "normalized_entropy": ent / log_n, "max_weight": mx}
        else:
            w = cache.layer_weights(lay).double()  # (B, Hs, L, S), zero beyond each text's keys
            per_row = _weight_metrics(w, batch["input_ids"], tokenizer, special_ids, n)
            cls_rows.append(_cls_targets(w, batch["input_ids"], tokenizer))
        for name in plan.metric_names:
            per_layer[name].append((per_row[name] * rows).sum((0, 2)))
    part.sums = {name: torch.stack(v) for name, v in per_layer.items()}
    if not plan.stats_only:
        part.cls_sum = torch.stack(cls_rows)
        # float32 here: the (K, K, rows, S) work of the JS matrix dominates the analysis.
        allw = torch.stack([cache.layer_weights(lay) for lay in lay_sel], 1).flatten(1, 2)
        x = allw.transpose(0, 1)[:, tm]  # (K, rows, S) real query rows of every text
        part.js_sum = M.js_matrix(x, reduction="sum").double()
        flat = x.reshape(len(lay_sel) * len(head_sel), -1).double()
        part.dots = flat @ flat.T
        if example:
            m = int(n[0])
            part.example_tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0, :m].tolist())
            part.example_weights = {lay: cache.layer_weights(lay)[0, :, :m, :m].clone() for lay in lay_sel}
    cache.clear()
    if plan.importance and len(chunk) > 1:
        from headwise.pretrained import mean_pool

        ref = mean_pool(out.last_hidden_state, batch["attention_mask"])
        part.grad_abs = gradient_importance_frozen(model, [{**batch, "reference": ref}]).raw
    return part


def combine(plan: AnalysisPlan, partials: Sequence[BatchPartial]) -> CorpusAnalysis:
    """The analysis of a corpus from its batches' partial sums, added up in the order given."""
    if not partials:
        raise bad_argument("partials", "at least one analysed batch", "none")
    lay_sel, head_sel = list(plan.layers), list(plan.heads)
    res = CorpusAnalysis(lay_sel, head_sel, {})
    sums = {n: torch.zeros(len(lay_sel), len(head_sel), dtype=torch.float64) for n in plan.metric_names}
    K = len(lay_sel) * len(head_sel)
    js_sum = torch.zeros(K, K, dtype=torch.float64)
    dots = torch.zeros(K, K, dtype=torch.float64)
    cls_sum = torch.zeros(len(lay_sel), 3, dtype=torch.float64)
    grad_total, n_grad = None, 0
    for part in partials:
        res.n_texts += part.n_texts
        res.n_tokens += part.n_tokens
        for name in plan.metric_names:
            sums[name] += part.sums[name]
        if not plan.stats_only:
            js_sum += part.js_sum
            dots += part.dots
            cls_sum += part.cls_sum
            if part.example_tokens and not res.example_tokens:
                res.example_tokens, res.example_weights = part.example_tokens, part.example_weights
        if part.grad_abs is not None:
            grad_total = part.grad_abs.clone() if grad_total is None else grad_total + part.grad_abs
            n_grad += 1
    res.n_rows = res.n_tokens  # every real token is one query row
    res.metrics = {name: (s / res.n_rows).float() for name, s in sums.items()}
    if not plan.stats_only:
        res.js = (js_sum / res.n_rows).float()
        norm = dots.diagonal().sqrt().clamp_min(1e-30)
        res.cosine = (dots / norm.view(-1, 1) / norm.view(1, -1)).float()
        res.patterns = [
            [
                M.classify_masses(float(res.metrics["vertical"][i, j]), float(res.metrics["diagonal"][i, j]))
                for j in range(len(head_sel))
            ]
            for i in range(len(lay_sel))
        ]
        res.cls_targets = {
            lay: dict(zip(("cls", "sep", "other"), (cls_sum[i] / res.n_texts).tolist(), strict=True))
            for i, lay in enumerate(lay_sel)
        }
    if grad_total is not None:
        res.importance = importance_from_total(grad_total, n_grad)
    return res


def analyze_texts(
    texts: Sequence[str],
    tokenizer: Any,
    model: Any,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    stats_only: bool = False,
    importance: bool = True,
    batch_size: int = 32,
    max_length: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> CorpusAnalysis:
    """Analyse ``texts`` in this process with a model loaded with ``attn_implementation="headwise"``.

    :func:`plan_analysis`, then :func:`analyze_batch` per batch and :func:`combine`: the Ray
    engine (headwise.engines.ray_data) runs the same three steps with the batches on workers.
    ``progress(done, total)`` is called after each batch (the CLI draws a bar with it).
    Gradient importance needs two texts or more (the loss contrasts texts of a batch).

    Example::

        >>> from headwise.analysis import register
        >>> from headwise.analysis.corpus import analyze_texts
        >>> from headwise.pretrained import load_minilm
        >>> _ = register()
        >>> tok, model = load_minilm("headwise")
        >>> res = analyze_texts(["a cat sat on the mat", "dogs bark"], tok, model, layers=[0], heads=[2])
        >>> res.patterns, round(float(res.metrics["max_weight"][0, 0]), 2) > 0.8
        ([['vertical+diagonal']], True)
    """
    plan, batches = plan_analysis(texts, model.config, layers=layers, heads=heads, stats_only=stats_only,
                                  importance=importance, batch_size=batch_size, max_length=max_length)  # fmt: skip
    partials = []
    for done, idx in enumerate(batches, 1):
        partials.append(analyze_batch([texts[i] for i in idx], tokenizer, model, plan, example=done == 1))
        if progress is not None:
            progress(done, len(batches))
    return combine(plan, partials)


def gradient_importance_frozen(model: Any, batches: list, gates: Tensor | None = None) -> Importance:
    """:func:`gradient_importance` with :func:`self_contrast_loss`, model weights frozen.

    Only the gates need a gradient: freezing the weights skips their gradients (about a
    third of the backward).
    """
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        return gradient_importance(model, batches, self_contrast_loss, gates)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def _weight_metrics(w: Tensor, ids: Tensor, tokenizer: Any, special_ids: Tensor, n: Tensor) -> dict[str, Tensor]:
    """Per-row metrics (B, Hs, L) of zero-padded weights (B, Hs, L, S); n (B,) real keys."""
    counts = n.view(-1, 1, 1).double()
    S = w.shape[-1]
    is_special = torch.isin(ids, special_ids)  # (B, S)
    is_sep = ids == tokenizer.sep_token_id if tokenizer.sep_token_id is not None else torch.zeros_like(is_special)
    is_cls = ids == tokenizer.cls_token_id if tokenizer.cls_token_id is not None else torch.zeros_like(is_special)
    idx = torch.arange(S)
    band = ((idx.view(-1, 1) - idx.view(1, -1)).abs() <= 1).view(1, 1, S, S)
    return {
        "entropy": M.entropy(w),
        "entropy_smoothed": _smoothed_entropy(w, counts),
        "normalized_entropy": M.normalized_entropy(w, key_counts=counts),
        "gini": M.gini(w, key_counts=counts),
        "sparsity": M.sparsity(w, key_counts=counts),
        "max_weight": M.max_weight(w),
        "mean_distance": M.mean_distance(w),
        "to_cls": (w * is_cls.view(-1, 1, 1, S)).sum(-1),
        "to_sep": (w * is_sep.view(-1, 1, 1, S)).sum(-1),
        "vertical": (w * is_special.view(-1, 1, 1, S)).sum(-1),
        "diagonal": (w * (band & ~is_special.view(-1, 1, 1, S))).sum(-1),
    }


def _smoothed_entropy(w: Tensor, counts: Tensor) -> Tensor:
    """Clark et al.'s smoothing over each text's own n real keys (padding keys stay 0)."""
    real = torch.arange(w.shape[-1]).view(1, 1, 1, -1) < counts.unsqueeze(-1)
    smooth = torch.where(real, (1 - M.CLARK_EPS) * w + M.CLARK_EPS / counts.unsqueeze(-1), torch.zeros_like(w))
    return M.entropy(smooth)


def _cls_targets(w: Tensor, ids: Tensor, tokenizer: Any) -> Tensor:
    """Sum over texts of the head-mean [CLS] row's mass on [CLS], [SEP] and other tokens (3,)."""
    row = w[:, :, 0, :].mean(1)  # (B, S): the [CLS] query (position 0) averaged over heads
    cls = (row * (ids == tokenizer.cls_token_id)).sum(-1)
    sep = (row * (ids == tokenizer.sep_token_id)).sum(-1)
    return torch.stack([cls.sum(), sep.sum(), (row.sum(-1) - cls - sep).sum()])
