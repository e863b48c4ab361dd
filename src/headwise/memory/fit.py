"""Train an enhancer on a :class:`VectorMemory`'s own contents and the user's labelled queries.

``fit_enhancer(memory, queries, relevant, config)`` runs the recipe measured on WordNet and
Debian (docs/memory-eval.md): a linear query adapter first, then, for ``method="multi-head"``,
the multi-head attention enhancer starting from that adapter (raw first pass, adapter trained
further), each with InfoNCE over every stored vector and early stopping on a held-out share of
the queries. It returns the trained enhancer and its history; ``memory.set_enhancer(enhancer)``
serves it and ``save_enhancer(memory, enhancer)`` writes it next to the store.

Shapes: queries (Q, d) float32 (or Q strings when the memory has a text encoder); relevant: Q
entries, each a list of stored ids or a dict {stored id: grade > 0}.

Example:
    >>> import numpy as np
    >>> from headwise.memory import VectorMemory
    >>> rng = np.random.default_rng(0)
    >>> mem = VectorMemory(16)
    >>> ids = mem.add(rng.standard_normal((200, 16)).astype(np.float32))
    >>> queries = mem.vectors(ids[:100]) + 0.3 * rng.standard_normal((100, 16)).astype(np.float32)
    >>> enh, hist = fit_enhancer(mem, queries, [[i] for i in ids[:100]], FitConfig(method="linear", steps=20,
    ...                          batch_size=16, eval_every=10), progress=False)
    >>> type(enh).__name__, hist["linear"].best_step >= 0
    ('LinearAdapter', True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from headwise.errors import bad_argument
from headwise.memory.architecture import EnhancerConfig
from headwise.memory.enhancer import LinearAdapter, QueryEnhancer, load_enhancer

ENHANCER_DIR = "enhancer"


@dataclass
class FitConfig:
    """The training recipe (defaults: the WordNet recipe of docs/memory-eval.md)."""

    method: str = "multi-head"  # "linear" or "multi-head"
    steps: int = 600  # per stage; early stopping usually ends sooner
    multi_head_steps: int = 800
    lr: float = 2e-3
    batch_size: int = 256
    #: the attention stage of method "multi-head" (its first pass is always "raw": the adapter is trained with it)
    enhancer: EnhancerConfig = field(default_factory=EnhancerConfig)
    eval_every: int = 100
    patience: int = 3
    validation: float = 0.1  # share of the queries held out for early stopping
    seed: int = 0


def _as_relevance(memory: Any, relevant: Sequence[Any], n: int) -> list[dict[int, int]]:
    """Store ids -> row indices of memory.ids(), as {row: grade} per query."""
    if len(relevant) != n:
        raise bad_argument("relevant", f"one entry per query ({n})", len(relevant))
    rows = {int(i): r for r, i in enumerate(memory.ids())}
    out = []
    for qi, rel in enumerate(relevant):
        pairs = rel.items() if isinstance(rel, dict) else ((d, 1) for d in rel)
        entry = {}
        for doc, grade in pairs:
            if int(doc) not in rows:
                raise bad_argument(f"relevant[{qi}]", "ids stored in the memory", repr(doc))
            if isinstance(grade, bool) or not isinstance(grade, int | float) or grade <= 0:
                raise bad_argument(f"relevant[{qi}][{doc!r}]", "a grade > 0", repr(grade))
            entry[rows[int(doc)]] = grade
        if not entry:
            raise bad_argument(f"relevant[{qi}]", "at least one relevant id", rel)
        out.append(entry)
    return out


def fit_enhancer(
    memory: Any, queries: Any, relevant: Sequence[Any], config: FitConfig | None = None, *, progress: bool = True
) -> tuple[LinearAdapter | QueryEnhancer, dict[str, Any]]:
    """Train an enhancer for ``memory`` (see the module docstring). Returns (enhancer, {stage: History})."""
    from headwise.memory.train import TrainConfig, TrainData, make_model, train

    cfg = config or FitConfig()
    if cfg.method not in ("linear", "multi-head"):
        raise bad_argument("config.method", "'linear' or 'multi-head'", repr(cfg.method))
    if not isinstance(cfg.enhancer, EnhancerConfig) or cfg.enhancer.mechanism == "flash":
        raise bad_argument("config.enhancer", "an EnhancerConfig with a candidate mechanism", cfg.enhancer)
    if not 0 < cfg.validation < 1:
        raise bad_argument("config.validation", "a share in (0, 1)", cfg.validation)
    if getattr(memory, "metric", None) != "cosine":
        raise bad_argument("memory", "a cosine VectorMemory (the enhancers refine unit queries)", memory)
    if len(queries) and isinstance(queries[0], str):
        queries = memory._require_encoder("fit_enhancer on strings").encode(list(queries))
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim != 2 or q.shape[1] != memory.dim or len(q) < 2:
        raise bad_argument("queries", f"(Q >= 2, {memory.dim}) vectors or Q >= 2 strings", q.shape)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    rel = _as_relevance(memory, relevant, len(q))
    docs = memory.vectors(memory.ids())
    order = np.random.default_rng(cfg.seed).permutation(len(q))
    n_val = max(1, int(round(len(q) * cfg.validation)))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    if len(train_idx) == 0:
        raise bad_argument("queries", "more queries than the validation share takes", len(q))
    arch = replace(cfg.enhancer, candidates=min(cfg.enhancer.candidates, len(docs)), first_pass="raw")
    data = TrainData.build(docs, q, rel, train_idx, val_idx, k=arch.candidates)

    def run(model: Any, steps: int, label: str) -> Any:
        tc = TrainConfig(steps=steps, batch_size=min(cfg.batch_size, len(train_idx)), lr=cfg.lr,
                         eval_every=cfg.eval_every, patience=cfg.patience, seed=cfg.seed)  # fmt: skip
        if not progress:
            return train(model, data, tc)
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(f"training {label}", total=steps)
            return train(model, data, tc, progress=lambda step, entry: bar.update(task, completed=step))

    linear = make_model("linear", memory.dim, seed=cfg.seed)
    history = {"linear": run(linear, cfg.steps, "the linear adapter")}
    if cfg.method == "linear":
        return linear, history
    enh = arch.build(memory.dim, seed=cfg.seed)
    enh.adopt_adapter(linear, freeze=False)
    history["multi-head"] = run(enh, cfg.multi_head_steps, "the multi-head enhancer")
    return enh, history


def save_enhancer(memory: Any, enhancer: Any) -> Path:
    """Write ``enhancer`` (safetensors + JSON) into ``memory.path / "enhancer"``; returns that folder."""
    if getattr(memory, "path", None) is None:
        raise bad_argument("memory", "a VectorMemory with a directory (path=...)", "an in-memory store")
    enhancer.save(Path(memory.path) / ENHANCER_DIR)
    return Path(memory.path) / ENHANCER_DIR


def load_saved_enhancer(memory: Any) -> Any:
    """The enhancer saved next to ``memory`` by :func:`save_enhancer`, set on the memory and returned."""
    if getattr(memory, "path", None) is None:
        raise bad_argument("memory", "a VectorMemory with a directory (path=...)", "an in-memory store")
    enhancer = load_enhancer(Path(memory.path) / ENHANCER_DIR)
    attach = getattr(enhancer, "attach", None)
    if callable(attach):  # a flash enhancer follows this store's records (QueryEnhancer.attach)
        attach(memory)
    memory.set_enhancer(enhancer)
    return enhancer
