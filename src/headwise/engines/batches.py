"""The per-batch work of the corpus jobs, as plain callables (no Ray needed to run or test them).

Ray Data's ``map_batches`` builds one instance per actor (so MiniLM loads once per worker)
and calls it with a batch: a dict of numpy columns. The in-process engine runs the same
functions these callables wrap (:func:`headwise.pretrained.encode` and
:func:`headwise.analysis.corpus.analyze_batch`), on the same batches.

- :class:`EmbedBatch`: ``{"index": (n,), "text": (n,)}`` -> ``{"index": (n,), "embedding": (n, 384)}``
  float32, L2-normalised MiniLM sentence embeddings.
- :class:`AnalyzeBatch`: ``{"batch": (m,), "texts": (m,) lists of str}`` -> ``{"batch": (m,),
  "partial": (m,) bytes}``; each row is one analysis batch and its
  :class:`~headwise.analysis.corpus.BatchPartial` as ``.npz`` bytes.

Example:
    >>> import numpy as np
    >>> embedder = EmbedBatch()
    >>> out = embedder({"index": np.array([7, 3]), "text": np.array(["a cat sat", "dogs bark"])})
    >>> out["index"].tolist(), out["embedding"].shape, out["embedding"].dtype
    ([7, 3], (2, 384), dtype('float32'))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from headwise.errors import bad_argument

MINILM = "minilm"


def _texts(column: Any, name: str) -> list[str]:
    """A numpy (or list) column of strings as a list of str (numpy gives ``np.str_`` or objects)."""
    if any(not isinstance(t, str) for t in column):  # np.str_ is a str
        raise bad_argument(name, "a column of strings", [type(t).__name__ for t in column][:3])
    return [str(t) for t in column]


class EmbedBatch:
    """MiniLM embeddings of a batch of texts (loads the model on construction).

    ``batch_size`` texts per forward inside the batch (128, as the in-process engine);
    ``max_length`` tokens at most per text.
    """

    def __init__(self, batch_size: int = 128, max_length: int = 128) -> None:
        from headwise.pretrained import load_minilm

        if batch_size < 1 or max_length < 1:
            raise bad_argument("batch_size/max_length", "positive integers", (batch_size, max_length))
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer, self.model = load_minilm()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from headwise.pretrained import encode

        texts = _texts(batch["text"], "text")
        emb = encode(texts, self.tokenizer, self.model, batch_size=self.batch_size, max_length=self.max_length,
                     progress=False)  # fmt: skip
        return {"index": np.asarray(batch["index"], dtype=np.int64), "embedding": emb}


class AnalyzeBatch:
    """Per-head analysis of analysis batches (one per row), with the model loaded once.

    ``plan`` is :meth:`AnalysisPlan.to_dict` (plain JSON values: it travels to the workers);
    ``model`` is ``"minilm"`` (the bundled model) or a local transformers model directory,
    which every worker must be able to read. Row ``batch == 0`` keeps the example weights.
    """

    def __init__(self, plan: dict[str, Any], model: str = MINILM) -> None:
        from headwise.analysis import register
        from headwise.analysis.corpus import AnalysisPlan
        from headwise.pretrained import load_minilm

        register()
        self.plan = AnalysisPlan.from_dict(plan)
        self.tokenizer, self.model = load_minilm("headwise", path=None if model == MINILM else model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from headwise.analysis.corpus import analyze_batch

        ids = np.asarray(batch["batch"], dtype=np.int64)
        partials = [
            analyze_batch(_texts(texts, "texts"), self.tokenizer, self.model, self.plan, example=int(i) == 0).to_bytes()
            for i, texts in zip(ids, batch["texts"], strict=True)
        ]
        out = np.empty(len(partials), dtype=object)
        out[:] = partials
        return {"batch": ids, "partial": out}


__all__ = ["AnalyzeBatch", "EmbedBatch"]
