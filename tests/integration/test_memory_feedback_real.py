"""The feedback loop on real data: WordNet example sentences arrive as feedback for their synset's gloss.

A store of 3,000 real glosses (MiniLM embeddings, cached in pytest's cache directory); the
example sentences of 2,400 synsets arrive as ``record_feedback`` pairs in batches, and the
examples of the other 600 are the held-out test queries, searched through the store. With
few pairs the adapter cannot beat plain search (early stopping on a handful of validation
pairs keeps it near the identity); with more it does.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_data
from headwise.data.wordnet import load_synsets, wordnet_available
from headwise.memory import MiniLMEncoder, VectorMemory
from headwise.memory.feedback_loop import simulate_feedback
from headwise.memory.fit import FitConfig

N_DOCS = 3000


@pytest.mark.data
@pytest.mark.slow
def test_recall_improves_as_feedback_accumulates(request, tmp_path):
    require_data(wordnet_available(), "WordNet (Debian package wordnet-base)")
    with_examples = [s for s in load_synsets() if s.examples]
    chosen = with_examples[:: len(with_examples) // N_DOCS][:N_DOCS]  # spread over every part of speech
    encoder = MiniLMEncoder(request.config.cache.mkdir("headwise-memory-minilm"), progress=False)
    docs = encoder.encode([s.document for s in chosen])
    examples = encoder.encode([s.examples[0] for s in chosen])
    test_rows = np.arange(0, N_DOCS, 5)
    feedback_rows = np.random.default_rng(0).permutation(np.setdiff1d(np.arange(N_DOCS), test_rows))
    memory = VectorMemory(384, path=tmp_path / "store")
    ids = memory.add(docs)
    fit = FitConfig(method="linear", steps=300, batch_size=128, lr=2e-3, eval_every=25, patience=3)
    rows = simulate_feedback(
        memory,
        examples[feedback_rows],
        [[int(ids[r])] for r in feedback_rows],
        examples[test_rows],
        [{int(ids[r]): 1} for r in test_rows],
        [300, 1200, 2400],
        fit,
    )
    recall = [r["recall@10"] for r in rows]
    assert [r["feedback"] for r in rows] == [0, 300, 1200, 2400]
    assert recall[-1] > recall[0] + 0.01  # 2,400 pairs help on queries whose synsets never arrived as feedback
    assert recall[-1] > recall[1]  # more feedback does better than the first batch
    memory.close()
    with VectorMemory.open(tmp_path / "store", read_only=True) as reopened:  # every pair was committed
        assert len(reopened.feedback()) == 2400
    print({r["feedback"]: round(r["recall@10"], 4) for r in rows})
