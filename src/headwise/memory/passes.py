"""The enhanced search's steps that every store shares: first pass, refine, second-pass inputs, merge.

An enhanced search (see :mod:`headwise.memory.store`) takes the top-K candidates of each
query, lets the enhancer refine the query from their vectors and scores, and searches again
with the refined query; on an approximate index the first pass's candidates, scored against
the refined query, then compete with the second pass's top-k. :class:`~headwise.memory.store.VectorMemory`
and :class:`~headwise.memory.milvus.MilvusMemory` run these same functions and differ only in
how they search: faiss slots whose vectors are gathered afterwards, or Milvus ids whose
vectors come back with the hits.

A candidate is named by a *key*: a faiss slot for the embedded store, a record id for Milvus;
-1 marks a place without a candidate.

Shapes: queries (n, d); candidates: scores (n, K), keys (n, K) int64, vectors (n, K, d);
results: scores (n, k) float32, keys (n, k) int64.

Example:
    >>> import numpy as np
    >>> q = np.array([[1.0, 0.0]], dtype=np.float32)
    >>> found = (np.array([[0.5, -np.inf]], dtype=np.float32), np.array([[7, -1]]))
    >>> extra_keys, extra_vectors = np.array([[9, 7]]), np.array([[[0.9, 0.1], [0.5, 0.5]]], dtype=np.float32)
    >>> scores, keys = merge_top("ip", q, *found, extra_keys, extra_vectors, 2)
    >>> keys.tolist(), [round(s, 2) for s in scores[0].tolist()]
    ([[9, 7]], [0.9, 0.5])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any

import numpy as np
import torch

from headwise.errors import HeadwiseError, bad_argument
from headwise.memory.checks import normalise_rows

#: merge_top() scores batches from this many queries with torch, smaller ones with numpy.
TORCH_MIN_ROWS = 32

#: (queries (n, d), K) -> scores (n, K), keys (n, K) with -1 where a row has fewer, and the
#: candidates' vectors (n, K, d), or None when they are gathered by key afterwards.
FirstPass = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
#: (queries (n, d), vectors (n, K, d) or None, scores (n, K) or None) -> refined queries (n, d).
Refine = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], np.ndarray]


def check_enhancer(enhancer: Any, store: Any) -> None:
    """Refuse an ``enhancer`` without ``candidates: int > 0`` and ``refine()``; attach it to ``store``.

    An enhancer with an ``attach(store)`` method is attached: a "flash" QueryEnhancer then
    reads the store's live vectors and follows every later write (:mod:`headwise.memory.binding`).
    None (no enhancer) passes.
    """
    if enhancer is None:
        return
    cands = getattr(enhancer, "candidates", None)
    if (
        not isinstance(cands, int)
        or isinstance(cands, bool)
        or cands <= 0
        or not callable(getattr(enhancer, "refine", None))
    ):
        raise bad_argument("enhancer", "an object with candidates: int > 0 and a refine() method", enhancer)
    attach = getattr(enhancer, "attach", None)
    if callable(attach):
        attach(store)


def use_enhancer(enhancer: Any, enhance: bool | None) -> bool:
    """Whether a search uses ``enhancer``: ``enhance`` None when one is set, True requires one, False never."""
    if enhance is None:
        return enhancer is not None
    if enhance and enhancer is None:
        raise bad_argument("enhance", "False or None when no enhancer is set (call set_enhancer)", True)
    return bool(enhance)


def refine_checked(
    enhancer: Any,
    q: np.ndarray,
    vectors: np.ndarray | None,
    scores: np.ndarray | None,
    *,
    dim: int,
    metric: str,
    metrics: Any,
) -> np.ndarray:
    """The enhancer's refined queries (n, d) from candidate vectors (n, K, d) and scores (n, K), checked.

    ``vectors`` None: the enhancer ignores candidates and is called with the queries alone.
    The output must be finite and of shape (n, d) (else a HeadwiseError); it is a fresh array
    (never a view of ``vectors``), L2-normalised for "cosine". The call is recorded as
    ``refine`` in ``metrics``.
    """
    args = (q,) if vectors is None else (q, vectors, scores)
    start = time.perf_counter()
    # headwise's enhancers skip their own checks of the arrays made here (refine_unchecked).
    refine = getattr(enhancer, "refine_unchecked", None) or enhancer.refine
    out = np.asarray(refine(*args), dtype=np.float32)
    if vectors is not None and np.may_share_memory(out, vectors):
        out = out.copy()  # the candidates may live in a workspace that the next search overwrites
    metrics.record("refine", time.perf_counter() - start, len(q))
    if out.shape != (len(q), dim) or not np.isfinite(out).all():
        raise HeadwiseError(
            f"enhancer.refine: expected finite queries of shape {(len(q), dim)}, got shape "
            f"{out.shape} (finite: {bool(np.isfinite(out).all())})"
        )
    return normalise_rows(out, "enhancer.refine output") if metric == "cosine" else out


def second_pass_inputs(
    enhancer: Any,
    q: np.ndarray,
    available: int,
    first_pass: FirstPass,
    gather: Callable[[np.ndarray], np.ndarray],
    refine: Refine,
    metrics: Any,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The second pass's queries (q refined by the enhancer from its first-pass top-K), and that
    top-K as (keys (n, K), vectors (n, K, d)), or None when the enhancer takes no candidates.

    ``available``: how many records the first pass can find (K is capped by it).
    ``first_pass(queries, K)`` searches with ``enhancer.first_pass_queries(q)`` where the
    enhancer has that method, else with q; ``gather(keys)`` fetches the vectors (n, K, d) of
    keys when the first pass returned none.

    Rows with fewer than K candidates (an approximate index may return fewer) repeat their
    last one, so the enhancer never sees padding; rows with none keep their query and have
    keys -1. The first pass is recorded as ``first_pass`` in ``metrics``.
    """
    if not getattr(enhancer, "uses_candidates", True):
        return refine(q, None, None), None
    big_k = min(int(enhancer.candidates), available)
    if big_k == 0:
        return q, None
    with metrics.timer("first_pass", len(q)):
        first = enhancer.first_pass_queries(q) if hasattr(enhancer, "first_pass_queries") else q
        s1, keys, vectors = first_pass(first, big_k)
    if keys.min() >= 0:  # the common case: K candidates in every row
        if vectors is None:
            vectors = gather(keys)
        return refine(q, vectors, s1), (keys, vectors)
    has_any = keys[:, 0] >= 0
    last = np.maximum.accumulate(np.where(keys >= 0, np.arange(keys.shape[1]), 0), axis=1)
    keys = np.take_along_axis(keys, last, axis=1)  # rows without any stay at -1
    s1 = np.take_along_axis(s1, last, axis=1)
    # Gathered by the padded keys, or the fetched vectors padded like the keys.
    vectors = gather(np.maximum(keys, 0)) if vectors is None else np.take_along_axis(vectors, last[:, :, None], axis=1)
    refined = q.copy()
    if has_any.any():
        refined[has_any] = refine(q[has_any], vectors[has_any], s1[has_any])
    return refined, (keys, vectors)


def merge_top(
    metric: str,
    queries: np.ndarray,
    scores: np.ndarray,
    keys: np.ndarray,
    extra_keys: np.ndarray,
    extra_vectors: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of a search's result (``scores``, ``keys`` (n, k)) and further candidates, scored against ``queries``.

    An approximate search can miss a neighbour that another search already found. Here
    ``extra_keys`` (n, m) are such candidates with their vectors ``extra_vectors`` (n, m, d),
    scored as "higher is better" for ``metric`` ("cosine" and "ip": inner product of the
    stored vectors, "l2": negative squared distance); a key found twice counts once, and so
    does a key repeated from the place before it (the padding of a short candidate list).
    Returns (scores (n, k) float32, keys (n, k) int64), best first, -inf / -1 padded.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    vectors = np.ascontiguousarray(extra_vectors, dtype=np.float32)
    if len(q) == 1:  # a served query: the vectorised union below is ~15 array operations of 1-4 µs
        return _merge_one(metric, q[0], scores[0], keys[0], extra_keys[0], vectors[0], k)
    if len(q) >= TORCH_MIN_ROWS:  # (n, m) inner products; torch spreads a batch over the cores, as (1, d) x (d, m)
        extra = torch.bmm(torch.from_numpy(q)[:, None, :], torch.from_numpy(vectors).transpose(1, 2))[:, 0].numpy()
    else:  # numpy costs a few µs per call where torch costs tens
        extra = np.matmul(vectors, q[:, :, None])[..., 0]
    if metric == "l2":  # -|q - x|^2
        extra = 2 * extra - np.einsum("nd,nd->n", q, q)[:, None] - np.einsum("nmd,nmd->nm", vectors, vectors)
    # A key already in the result, or a repeat of the key before it (the store pads short
    # candidate lists by repeating the last one), must not take a second place.
    dup = (extra_keys[:, :, None] == keys[:, None, :]).any(axis=2)
    dup[:, 1:] |= extra_keys[:, 1:] == extra_keys[:, :-1]
    dup |= extra_keys < 0  # a row without candidates
    extra[dup] = -np.inf
    all_scores = np.concatenate([scores, extra.astype(np.float32)], axis=1)
    all_keys = np.concatenate([keys, extra_keys], axis=1)
    best = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(all_scores, best, axis=1)
    top_keys = np.take_along_axis(all_keys, best, axis=1)
    top_keys[np.isneginf(top_scores)] = -1  # places that neither search filled
    return top_scores, top_keys


def _merge_one(
    metric: str, q: np.ndarray, scores: np.ndarray, keys: np.ndarray, extra_keys: np.ndarray, vectors: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """:func:`merge_top` of one query, q (d,), its result (k,), extra keys (m,) and vectors (m, d).

    The same union in Python lists: each numpy call costs 1-4 µs here, and the vectorised
    path makes about fifteen. The result's entries come first, then each extra key that is
    new; Python's sort is stable (also with ``reverse``), so ties keep that order, as the
    vectorised path's stable argsort does.
    """
    extra = vectors @ q  # (m,)
    if metric == "l2":
        extra = 2 * extra - q @ q - np.einsum("md,md->m", vectors, vectors)
    result = keys.tolist()
    items = [(key, score) for key, score in zip(result, scores.tolist()) if key >= 0]
    taken = set(result)
    for key, score in zip(extra_keys.tolist(), extra.tolist()):
        if key >= 0 and key not in taken:
            taken.add(key)
            items.append((key, score))
    items.sort(key=itemgetter(1), reverse=True)
    top = items[:k]
    pad = k - len(top)
    return (
        np.array([[score for _, score in top] + [-np.inf] * pad], dtype=np.float32),
        np.array([[key for key, _ in top] + [-1] * pad], dtype=np.int64),
    )
