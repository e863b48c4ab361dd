"""Training of query enhancers: InfoNCE over the whole corpus plus kNN-mined hard negatives.

The corpus embedding matrix D (N, d) stays frozen in memory (117,659 x 384 float32 is 181 MB),
so every training query is contrasted against *all* documents: ``logits = r D^T / tau`` and a
cross entropy towards its relevant document (the highest-graded one). On top, a second InfoNCE
term over the positive and the query's hardest negatives, mined once by exact kNN of the raw
query (the first-pass candidates that are not relevant), weighted by ``hard_weight``.

Candidates given to the attention stage are the exact top-K of the first-pass queries (the raw
query, or the enhancer's adapted query with ``first_pass="adapted"``), exactly what the store
hands to ``refine`` at search time. Early stopping keeps the weights with the best validation
recall@10 (second-pass retrieval over the whole corpus). Batches, initialisation and dropout are
drawn from ``seed``: two runs with one seed give the same weights.

Shapes: docs (N, d); queries (Q, d); positives (Q,); candidates (Q, K) int64; scores (Q, K).

Example:
    >>> import numpy as np
    >>> from headwise.memory.enhancer import LinearAdapter
    >>> rng = np.random.default_rng(0)
    >>> docs = rng.standard_normal((50, 8)).astype(np.float32)
    >>> docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    >>> queries = docs[:20] + 0.3 * rng.standard_normal((20, 8)).astype(np.float32)
    >>> data = TrainData.build(docs, queries, [{i: 1} for i in range(20)], np.arange(15), np.arange(15, 20), k=5)
    >>> hist = train(LinearAdapter(8), data, TrainConfig(steps=20, batch_size=8, eval_every=10))
    >>> len(hist.records), hist.best_step >= 0
    (3, True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from headwise.errors import bad_argument
from headwise.memory.enhancer import LinearAdapter, QueryEnhancer


@dataclass
class TrainConfig:
    """Hyperparameters (defaults measured on WordNet W1, see docs/memory-eval.md)."""

    steps: int = 1500  # upper bound; early stopping usually ends sooner
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4  # on W of q + W q: a pull towards the identity
    temperature: float = 0.05  # MiniLM cosines live in [0, 1]; 0.05 makes the softmax decisive
    hard_negatives: int = 16  # mined per query from its raw kNN list
    hard_weight: float = 0.5
    eval_every: int = 100
    patience: int = 4  # evaluations without improvement before stopping
    seed: int = 0


@dataclass
class TrainData:
    """Tensors of one training problem: corpus, queries, positives, first-pass candidates, hard negatives."""

    docs: Tensor
    queries: Tensor
    positives: Tensor
    cand_ids: Tensor
    cand_scores: Tensor
    hard: Tensor
    train_idx: np.ndarray
    val_idx: np.ndarray
    relevant: list[dict[int, int]]

    @classmethod
    def build(
        cls,
        docs: np.ndarray,
        queries: np.ndarray,
        relevant: Sequence[dict[int, int]],
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        *,
        k: int = 32,
        hard_negatives: int = 16,
        first_queries: np.ndarray | None = None,
    ) -> TrainData:
        """Mine the first-pass candidates (exact top-``k``) and hard negatives of every query.

        ``first_queries`` (Q, d): what the first pass searches with (an enhancer's
        ``first_pass_queries``; default the queries themselves).
        """
        from headwise.memory.evaluate import exact_search

        if len(queries) != len(relevant):
            raise bad_argument("relevant", f"one dict per query ({len(queries)})", len(relevant))
        if len(train_idx) == 0 or len(val_idx) == 0:
            raise bad_argument("train_idx, val_idx", "non-empty index arrays", (len(train_idx), len(val_idx)))
        depth = max(k, hard_negatives + 1)
        depth = min(depth + max(len(r) for r in relevant), len(docs))
        first = queries if first_queries is None else first_queries
        if first.shape != queries.shape:
            raise bad_argument("first_queries", f"an array of shape {queries.shape}", first.shape)
        scores, ids = exact_search(docs, first, depth)
        hard = np.zeros((len(queries), hard_negatives), dtype=np.int64)
        for i, rel in enumerate(relevant):
            negs = [d for d in ids[i] if d not in rel][:hard_negatives]
            negs += [negs[-1] if negs else 0] * (hard_negatives - len(negs))  # pad (tiny corpora only)
            hard[i] = negs
        positives = np.array([max(r, key=lambda d: (r[d], -d)) for r in relevant], dtype=np.int64)
        return cls(
            docs=torch.from_numpy(np.ascontiguousarray(docs, dtype=np.float32)),
            queries=torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)),
            positives=torch.from_numpy(positives),
            cand_ids=torch.from_numpy(ids[:, :k].copy()),
            cand_scores=torch.from_numpy(scores[:, :k].copy()),
            hard=torch.from_numpy(hard),
            train_idx=np.asarray(train_idx),
            val_idx=np.asarray(val_idx),
            relevant=list(relevant),
        )


@dataclass
class History:
    """Validation recall@10 per evaluation, the best step, and the losses."""

    records: list[dict[str, float]] = field(default_factory=list)
    best_step: int = -1
    best_recall: float = -1.0
    config: dict[str, Any] = field(default_factory=dict)


def refine_batch(model: torch.nn.Module, data: TrainData, idx: Tensor) -> Tensor:
    """Refined queries (b, d) of the queries ``idx`` with their mined first-pass candidates."""
    q = data.queries[idx]
    if getattr(model, "uses_candidates", True):
        K = model.candidates
        cand = data.docs[data.cand_ids[idx, :K]]
        return model(q, cand, data.cand_scores[idx, :K])
    return model(q)


@torch.no_grad()
def validation_recall(model: torch.nn.Module, data: TrainData, idx: np.ndarray, k: int = 10) -> float:
    """Recall@k of the second pass over the whole corpus, for the queries ``idx``."""
    was = model.training
    model.eval()
    hits = 0.0
    for s in range(0, len(idx), 1024):
        b = torch.from_numpy(idx[s : s + 1024])
        top = (refine_batch(model, data, b) @ data.docs.T).topk(k, dim=1).indices
        for row, qi in zip(top.tolist(), b.tolist()):
            rel = data.relevant[qi]
            hits += sum(1 for d in row if d in rel) / len(rel)
    model.train(was)
    return hits / len(idx)


def train(
    model: torch.nn.Module,
    data: TrainData,
    config: TrainConfig | None = None,
    *,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> History:
    """Train ``model`` in place; it ends with the weights of the best validation evaluation."""
    cfg = config or TrainConfig()
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.temperature <= 0:
        raise bad_argument("config", "steps >= 1, batch_size >= 1, temperature > 0", cfg)
    # The softmax over ~100k documents holds many probabilities below float32's normal range;
    # on x86 CPUs subnormal arithmetic made the backward pass 4x slower (measured: 4.3 s -> 1.0 s
    # per step on WordNet). Flushing them to zero changes gradients by < 1e-38 per entry.
    flush = torch.set_flush_denormal(True)
    try:
        return _train(model, data, cfg, progress)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _train(
    model: torch.nn.Module,
    data: TrainData,
    cfg: TrainConfig,
    progress: Callable[[int, dict[str, float]], None] | None,
) -> History:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if isinstance(model, QueryEnhancer) and model.mechanism == "flash":
        model.bind(data.docs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist = History(config=asdict(cfg))
    best_state = copy.deepcopy(model.state_dict())
    hist.best_recall = validation_recall(model, data, data.val_idx)
    hist.best_step = 0
    hist.records.append({"step": 0, "val_recall@10": hist.best_recall})  # no loss before the first step
    stale, order, pos, losses = 0, rng.permutation(data.train_idx), 0, []
    H = min(cfg.hard_negatives, data.hard.shape[1])
    model.train()
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(data.train_idx), 0
        idx = torch.from_numpy(order[pos : pos + cfg.batch_size])
        pos += cfg.batch_size
        r = refine_batch(model, data, idx)
        target = data.positives[idx]
        loss = F.cross_entropy(r @ data.docs.T / cfg.temperature, target)
        if cfg.hard_weight > 0 and H > 0:
            group = torch.cat([target[:, None], data.hard[idx, :H]], dim=1)  # positive first
            hard_logits = torch.einsum("bd,bkd->bk", r, data.docs[group]) / cfg.temperature
            loss = loss + cfg.hard_weight * F.cross_entropy(hard_logits, torch.zeros_like(target))
        if isinstance(model, QueryEnhancer) and model.mechanism == "moe":
            loss = loss + model.aux_weight * model.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec = validation_recall(model, data, data.val_idx)
            entry = {"step": step, "val_recall@10": rec, "loss": float(np.mean(losses))}
            hist.records.append(entry)
            losses = []
            if progress:
                progress(step, entry)
            if rec > hist.best_recall:
                hist.best_recall, hist.best_step, stale = rec, step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    model.load_state_dict(best_state)
    model.eval()
    return hist


def make_model(name: str, dim: int, *, seed: int = 0, **options: Any) -> torch.nn.Module:
    """``"linear"`` or an enhancer mechanism name, initialised from ``seed``.

    ``options``: the other fields of :class:`~headwise.memory.architecture.EnhancerConfig`
    (heads, hidden, layers, dropout, candidates, first_pass, MoE and hyperbolic options).
    """
    from headwise.memory.architecture import EnhancerConfig

    torch.manual_seed(seed)
    if name == "linear":
        return LinearAdapter(dim)
    try:
        config = EnhancerConfig(mechanism=name, **options)
    except TypeError as exc:
        raise bad_argument("options", "fields of EnhancerConfig", sorted(options)) from exc
    return config.build(dim)
