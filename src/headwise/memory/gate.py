"""A do-no-harm gate around a trained enhancer, and the corpus pseudo-queries it is trained with.

A learned enhancer moves a query towards where its *training* queries found their documents.
On queries of another style (a dictionary definition instead of an example sentence) that
move hurts: measured on WordNet, the multi-head enhancer loses 15% and 45% of cosine's recall@10 on
definitions from FOLDOC and the Devil's Dictionary (docs/memory-eval.md). The gate decides
per query how far to trust the move:

    r_gated = normalize((1 - g) b + g r),   g = sigmoid(MLP([q, cos(q, r), score features]))

with q the raw query, r the inner enhancer's refined query, b the fallback (the raw query, or
a second, frozen linear adapter such as one trained on corpus pseudo-queries alone) and the
score features the first pass's top score, mean, top - mean and spread over its candidates.
g = 0 is the fallback (plain cosine search by default), g = 1 the inner enhancer. The inner
enhancer stays frozen; the gate is trained on a *mixture* of query styles: the labelled
training queries, where moving helps, and pseudo-queries cut from the corpus's own documents
(:func:`pseudo_queries`: a span of a document's text as a query for that document), where the
raw query is usually already right.
Nothing from an evaluation query set is used.

Shape legend: queries (n, d), cand_vectors (n, K, d), cand_scores (n, K), docs (N, d).

Example:
    >>> import torch
    >>> from headwise.memory.enhancer import LinearAdapter
    >>> gated = GatedEnhancer(LinearAdapter(8))
    >>> q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    >>> bool(torch.allclose(gated(q), q, atol=1e-6))   # an untrained inner adapter is the identity
    True
    >>> pseudo_queries(["dog, domestic dog: a member of the genus Canis"], 1, seed=0)[0][1]
    0
    >>> docs = ["dog: a member of the genus Canis", "cat: a small domesticated carnivorous feline mammal"]
    >>> text, target = pseudo_queries(docs, 1, seed=1, style="lemma")[0]
    >>> docs[target].split(":")[0] in text.split()
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from headwise.errors import bad_argument
from headwise.memory.enhancer import LinearAdapter, QueryEnhancer, _as_array, _as_tensor, _Enhancer

N_SCORE_FEATURES = 4
SCORE_CANDIDATES = 8
N_FAMILIARITY, FAMILIARITY_NEIGHBOURS = 2, 10


PSEUDO_STYLES = ("span", "lemma", "mixed")


def pseudo_queries(
    documents: Sequence[str],
    n: int,
    *,
    seed: int = 0,
    exclude: Sequence[int] = (),
    min_words: int = 4,
    style: str = "span",
) -> list[tuple[str, int]]:
    """``n`` (query text, document index) pairs cut from the corpus alone (no labelled query).

    ``style``:

    - ``"span"``: a random span of a document's text as its query. The text after a leading
      ``"title: "`` (WordNet's lemma list) is used, so the query does not name its target; the
      span covers 50-100% of the words (at least ``min_words``). A definition-like query.
    - ``"lemma"``: one of the document's title words (a lemma) inserted at a random place in a
      5-15 word span of *another* document's text: a sentence that uses the word without
      defining it, as an example sentence does. Needs ``"title: text"`` documents.
    - ``"mixed"``: the two alternately.

    Documents in ``exclude`` (for example the targets of held-out queries) are never drawn.
    """
    if n < 1:
        raise bad_argument("n", "an integer >= 1", n)
    if style not in PSEUDO_STYLES:
        raise bad_argument("style", f"one of {PSEUDO_STYLES}", repr(style))
    rng = np.random.default_rng(seed)
    banned = set(int(i) for i in exclude)
    pool = np.array([i for i in range(len(documents)) if i not in banned])
    out: list[tuple[str, int]] = []
    for i in rng.permutation(pool):
        text = documents[i]
        head, sep, rest = text.partition(": ")
        use_lemma = style == "lemma" or (style == "mixed" and len(out) % 2 == 1)
        if use_lemma:
            lemmas = [w.strip() for w in head.split(",") if w.strip()] if sep else []
            context = documents[int(rng.integers(0, len(documents)))].partition(": ")[2].split()
            if not lemmas or len(context) < 5:
                continue
            size = int(rng.integers(5, 16))
            start = int(rng.integers(0, max(1, len(context) - size + 1)))
            words = context[start : start + size]
            words.insert(int(rng.integers(0, len(words) + 1)), lemmas[int(rng.integers(0, len(lemmas)))])
            out.append((" ".join(words), int(i)))
        else:
            words = (rest if sep and rest else text).split()
            if len(words) < min_words:
                continue
            size = max(min_words, int(np.ceil(len(words) * rng.uniform(0.5, 1.0))))
            start = int(rng.integers(0, len(words) - size + 1))
            out.append((" ".join(words[start : start + size]), int(i)))
        if len(out) == n:
            break
    return out


class GatedEnhancer(_Enhancer):
    """``normalize((1 - g) q + g r)`` around a frozen inner enhancer (see the module docstring).

    Args:
        inner: a trained :class:`LinearAdapter` or :class:`QueryEnhancer`; frozen here.
        hidden: width of the gate's hidden layer.
        initial_gate: g before training (the output bias is its logit): close to 1 starts
            from the inner enhancer, close to 0 from plain cosine search.
    """

    def __init__(
        self,
        inner: LinearAdapter | QueryEnhancer,
        *,
        hidden: int = 64,
        initial_gate: float = 0.5,
        anchors: int = 0,
        read_query: bool = True,
        fallback: LinearAdapter | None = None,
    ):
        super().__init__()
        if not isinstance(inner, LinearAdapter | QueryEnhancer):
            raise bad_argument("inner", "a LinearAdapter or QueryEnhancer", type(inner).__name__)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise bad_argument("hidden", "an integer >= 1", repr(hidden))
        if not 0 < initial_gate < 1:
            raise bad_argument("initial_gate", "a number in (0, 1)", repr(initial_gate))
        if isinstance(anchors, bool) or not isinstance(anchors, int) or anchors < 0:
            raise bad_argument("anchors", "an integer >= 0", repr(anchors))
        if fallback is not None and (not isinstance(fallback, LinearAdapter) or fallback.dim != inner.dim):
            raise bad_argument("fallback", f"a LinearAdapter of dim {inner.dim} or None", type(fallback).__name__)
        self.inner = inner.requires_grad_(False)
        # Where the gate closes, the query goes to the fallback (default: the raw query itself).
        self.fallback = fallback.requires_grad_(False) if fallback is not None else None
        # The gate reads the first pass's scores even where the inner enhancer ignores them (a
        # linear adapter): the store is asked for at least SCORE_CANDIDATES neighbours.
        self.dim, self.candidates, self.uses_candidates = inner.dim, max(inner.candidates, SCORE_CANDIDATES), True
        self.hidden, self.initial_gate, self.read_query = hidden, initial_gate, bool(read_query)
        # Anchors: training queries the gate was *not* trained on; a query's cosine to its
        # nearest anchors says how familiar its style is (set with set_anchors, saved with the weights).
        self.register_buffer("anchors", torch.zeros(anchors, inner.dim))
        # read_query=False: the gate sees only the summary features, never the query vector.
        self.gate_in = nn.Linear(inner.dim * self.read_query + 1 + N_SCORE_FEATURES + N_FAMILIARITY, hidden)
        self.gate_out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.gate_out.weight)
        nn.init.constant_(self.gate_out.bias, float(np.log(initial_gate / (1 - initial_gate))))

    def set_anchors(self, queries: Any) -> GatedEnhancer:
        """Keep (n, d) unit query embeddings as anchors of familiarity (see the module docstring). Returns self."""
        a = _as_array(queries, "anchors", 2, self.dim)
        if len(a) < FAMILIARITY_NEIGHBOURS:
            raise bad_argument("anchors", f"at least {FAMILIARITY_NEIGHBOURS} queries", len(a))
        self.anchors = torch.from_numpy(a.copy())
        return self

    def config(self) -> dict[str, Any]:
        inner = {"class": type(self.inner).__name__, **self.inner.config()}
        fallback = None if self.fallback is None else {"class": "LinearAdapter", **self.fallback.config()}
        return {"fallback": fallback, "inner": inner, "hidden": self.hidden, "initial_gate": self.initial_gate,
                "anchors": len(self.anchors), "read_query": self.read_query}  # fmt: skip

    def attach(self, memory: Any) -> None:
        """Forwarded to the inner enhancer when a store sets this gate (a "flash" inner one follows the store)."""
        attach = getattr(self.inner, "attach", None)
        if callable(attach):
            attach(memory)

    def first_pass_queries(self, queries: Any) -> np.ndarray:
        """What the store's first pass searches with: the inner enhancer's choice."""
        if isinstance(self.inner, QueryEnhancer):
            return self.inner.first_pass_queries(queries)
        return _as_array(queries, "queries", 2, self.dim)

    def familiarity(self, q: Tensor) -> Tensor:
        """(n, 2): the top cosine and the mean of the top FAMILIARITY_NEIGHBOURS cosines to the anchors."""
        if len(self.anchors) < FAMILIARITY_NEIGHBOURS:
            return q.new_zeros(q.shape[0], N_FAMILIARITY)
        top = (q @ self.anchors.T).topk(FAMILIARITY_NEIGHBOURS, dim=1).values
        return torch.stack([top[:, 0], top.mean(dim=1)], dim=1)

    def gate(self, q: Tensor, r: Tensor, scores: Tensor | None) -> Tensor:
        """g (n, 1) in (0, 1) from the raw query, the refined one, the first-pass scores and familiarity."""
        if scores is None or scores.shape[-1] == 0:
            feats = q.new_zeros(q.shape[0], N_SCORE_FEATURES)
        else:
            top, mean = scores[:, :1], scores.mean(dim=1, keepdim=True)
            spread = scores.std(dim=1, keepdim=True) if scores.shape[1] > 1 else torch.zeros_like(top)
            feats = torch.cat([top, mean, top - mean, spread], dim=1)
        cos = (q * r).sum(dim=1, keepdim=True)
        parts = [q, cos, feats, self.familiarity(q)] if self.read_query else [cos, feats, self.familiarity(q)]
        hidden = F.gelu(self.gate_in(torch.cat(parts, dim=1)))
        return torch.sigmoid(self.gate_out(hidden))

    def base(self, q: Tensor) -> Tensor:
        """Where a closed gate sends the query: the fallback's query, or the raw query."""
        if self.fallback is None:
            return q
        with torch.no_grad():
            return self.fallback(q)

    def mix(self, q: Tensor, r: Tensor, scores: Tensor | None) -> Tensor:
        """The gated query (n, d) from the raw query and the inner enhancer's refined query."""
        return F.normalize((1 - (g := self.gate(q, r, scores))) * self.base(q) + g * r, dim=-1)

    def forward(self, q: Tensor, cand: Tensor | None = None, scores: Tensor | None = None) -> Tensor:
        with torch.no_grad():  # the inner enhancer is frozen: only the gate learns
            if self.inner.uses_candidates:
                K = self.inner.candidates
                r = self.inner(q, None if cand is None else cand[:, :K], None if scores is None else scores[:, :K])
            else:
                r = self.inner(q)
        return self.mix(q, r, scores)

    @torch.no_grad()
    def _mix_arrays(self, q: np.ndarray, r: np.ndarray, s: np.ndarray | None) -> np.ndarray:
        was = self.training
        self.eval()
        try:
            out = self.mix(_as_tensor(q), _as_tensor(r), None if s is None else _as_tensor(s))
        finally:
            self.train(was)
        return out.numpy()

    def refine(self, queries: Any, cand_vectors: Any = None, cand_scores: Any = None) -> np.ndarray:
        """The inner enhancer's :meth:`refine` (its fast serving plan), then the gate."""
        q, c, s = self._checked(queries, cand_vectors, cand_scores, finite=True)
        return self._mix_arrays(q, self._inner_refine(self.inner.refine, q, c, s), s)

    def refine_unchecked(self, q: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
        return self._mix_arrays(q, self._inner_refine(self.inner.refine_unchecked, q, c, s), s)

    def _inner_refine(self, refine: Callable, q: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
        if not self.inner.uses_candidates:
            return refine(q)
        K = self.inner.candidates  # the store may hand over fewer than K
        return refine(q, np.ascontiguousarray(c[:, :K]), np.ascontiguousarray(s[:, :K]))


@dataclass
class GateData:
    """Precomputed inputs of gate training: raw and inner-refined queries, first-pass scores,
    each query's contrast set (the union of the raw and the refined query's top ``depth`` and
    its positive, duplicates masked), the positive's place in it, and the query's style."""

    q: Tensor
    r: Tensor
    scores: Tensor
    contrast: Tensor  # (n, C) doc ids
    valid: Tensor  # (n, C) bool: False for repeated ids
    target: Tensor  # (n,) index of the positive in contrast
    style: Tensor  # 0: labelled training query, 1: corpus pseudo-query
    relevant: list[dict[int, int]]

    @classmethod
    def build(cls, gated: GatedEnhancer, docs: np.ndarray, queries: np.ndarray, relevant: Sequence[dict[int, int]],
              style: np.ndarray, *, depth: int = 100, batch: int = 2048) -> GateData:  # fmt: skip
        """Run the first pass (exact top-K) and the frozen inner enhancer once over every query.

        The gated query lies between q and r, so its softmax over the whole corpus is, to a
        very good approximation, its softmax over the contrast set: training then costs a
        (b, C) product per step instead of a (b, N) one.
        """
        from headwise.memory.evaluate import exact_search, flat_index

        index = flat_index(docs)
        depth = min(depth, len(docs))
        rs, ss, cs = [], [], []
        for s in range(0, len(queries), batch):
            qb = np.ascontiguousarray(queries[s : s + batch], dtype=np.float32)
            scores, ids = exact_search(index, gated.first_pass_queries(qb), gated.candidates)
            rb = gated._inner_refine(gated.inner.refine, qb, docs[ids], scores)
            rs.append(rb)
            ss.append(scores)
            cs.append(np.concatenate([exact_search(index, qb, depth)[1], exact_search(index, rb, depth)[1]], axis=1))
        positives = np.array([max(r, key=lambda d: (r[d], -d)) for r in relevant], dtype=np.int64)
        contrast = np.concatenate([np.concatenate(cs), positives[:, None]], axis=1)
        valid = np.ones(contrast.shape, dtype=bool)
        order = np.argsort(contrast, axis=1, kind="stable")
        ranked = np.take_along_axis(contrast, order, axis=1)
        repeat = np.zeros(contrast.shape, dtype=bool)
        repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
        np.put_along_axis(valid, order, ~repeat, axis=1)  # the first occurrence of each id stays
        target = np.argmax((contrast == positives[:, None]) & valid, axis=1)
        return cls(
            q=torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)),
            r=torch.from_numpy(np.concatenate(rs)),
            scores=torch.from_numpy(np.concatenate(ss)),
            contrast=torch.from_numpy(contrast),
            valid=torch.from_numpy(valid),
            target=torch.from_numpy(target),
            style=torch.from_numpy(np.asarray(style, dtype=np.int64)),
            relevant=list(relevant),
        )

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q[idx], self.r[idx], self.scores[idx]


@dataclass
class GateConfig:
    steps: int = 400
    batch_size: int = 256
    lr: float = 3e-3
    temperature: float = 0.05
    eval_every: int = 50
    patience: int = 4
    seed: int = 0
    # > 0: each query's loss also pays harm_weight x (its loss - its loss at g = 0) where the
    # gated query does worse than the raw one: a move that hurts costs more than one that helps.
    harm_weight: float = 0.0


@torch.no_grad()
def _recall_by_style(gated: GatedEnhancer, data: GateData, docs: Tensor, idx: np.ndarray) -> dict[int, float]:
    """Recall@10 of the gated queries ``idx``, averaged within each style."""
    from headwise.memory.evaluate import per_query_metrics

    gated.eval()
    hits = np.zeros(len(idx))
    for s in range(0, len(idx), 1024):
        b = torch.from_numpy(idx[s : s + 1024])
        top = (gated.mix(*data.take(b)) @ docs.T).topk(10, dim=1).indices.numpy()
        hits[s : s + len(b)] = per_query_metrics(top, [data.relevant[qi] for qi in b.tolist()])["recall@10"]
    styles = data.style[torch.from_numpy(idx)].numpy()
    return {int(k): float(hits[styles == k].mean()) for k in np.unique(styles)}


def train_gate(
    gated: GatedEnhancer,
    data: GateData,
    docs: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: GateConfig | None = None,
    *,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train the gate (InfoNCE over the whole corpus, styles balanced in every batch).

    Early stopping keeps the gate with the best *mean over styles* of validation recall@10,
    so that neither style may be traded away for the other. Returns the evaluation records.
    """
    cfg = config or GateConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    D = torch.from_numpy(np.ascontiguousarray(docs, dtype=np.float32))
    by_style = [train_idx[data.style[torch.from_numpy(train_idx)].numpy() == k] for k in (0, 1)]
    if any(len(b) == 0 for b in by_style):
        raise bad_argument("train_idx", "training queries of both styles", [len(b) for b in by_style])
    params = [p for n, p in gated.named_parameters() if n.startswith("gate_")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)

    def evaluate(step: int, loss: float | None) -> dict[str, float]:
        by = _recall_by_style(gated, data, D, val_idx)
        rec = {"step": step, "val_recall@10 labelled": by.get(0, 0.0), "val_recall@10 pseudo": by.get(1, 0.0)}
        rec["objective"] = (rec["val_recall@10 labelled"] + rec["val_recall@10 pseudo"]) / 2
        return rec if loss is None else {**rec, "loss": loss}

    records = [evaluate(0, None)]
    best, best_state, stale, losses = records[0]["objective"], copy.deepcopy(gated.state_dict()), 0, []
    half = cfg.batch_size // 2
    flush = torch.set_flush_denormal(True)  # see train.train: the full-corpus softmax underflows
    try:
        for step in range(1, cfg.steps + 1):
            gated.train()
            idx = torch.from_numpy(np.concatenate([rng.choice(b, size=half) for b in by_style]))
            q, r_in, scores = data.take(idx)
            cands, invalid = D[data.contrast[idx]], ~data.valid[idx]

            def nll(x: Tensor, cands: Tensor = cands, invalid: Tensor = invalid, idx: Tensor = idx) -> Tensor:
                logits = torch.einsum("bd,bcd->bc", x, cands) / cfg.temperature
                return F.cross_entropy(logits.masked_fill(invalid, float("-inf")), data.target[idx], reduction="none")

            per_query = nll(gated.mix(q, r_in, scores))
            loss = per_query.mean()
            if cfg.harm_weight > 0:
                loss = loss + cfg.harm_weight * F.relu(per_query - nll(gated.base(q)).detach()).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec = evaluate(step, float(np.mean(losses)))
                records.append(rec)
                losses = []
                if progress:
                    progress(step, rec)
                if rec["objective"] > best:
                    best, best_state, stale = rec["objective"], copy.deepcopy(gated.state_dict()), 0
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
    finally:
        if flush:
            torch.set_flush_denormal(False)
    gated.load_state_dict(best_state)
    gated.eval()
    return records
