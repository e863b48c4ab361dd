"""The enhancers on a real WordNet slice: identity at init, learning, determinism, save/load, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import require_data

from headwise.data.wordnet import wordnet_available
from headwise.errors import HeadwiseError
from headwise.memory.datasets import embed_dataset, wordnet_w1
from headwise.memory.enhancer import MECHANISMS, LinearAdapter, QueryEnhancer, load_enhancer
from headwise.memory.evaluate import enhanced_retriever, knn_retriever, per_query_metrics
from headwise.memory.train import TrainConfig, TrainData, make_model, train

K = 16
CFG = TrainConfig(steps=240, batch_size=64, lr=2e-3, eval_every=40, patience=3, seed=1)


@pytest.fixture(scope="module")
def slice_data():
    """WordNet's first 300 synsets of each part of speech (1,200 glosses, 775 queries), embedded once."""
    require_data(wordnet_available(), "WordNet (wordnet-base)")
    ds = wordnet_w1(limit=300)
    docs, queries = embed_dataset(ds, progress=False)
    data = TrainData.build(docs, queries, ds.relevant, ds.split["train"], ds.split["validation"], k=K)
    return ds, docs, queries, data


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_untrained_enhancer_is_cosine_knn(slice_data, mechanism):
    ds, docs, queries, _ = slice_data
    enh = QueryEnhancer(384, mechanism=mechanism, candidates=K)
    if mechanism == "flash":
        enh.bind(docs)
    test = ds.split["test"]
    assert np.array_equal(enhanced_retriever(docs, enh)(queries[test], 10), knn_retriever(docs)(queries[test], 10))


def test_multi_head_learns_on_real_slice(slice_data):
    ds, docs, queries, data = slice_data
    model = make_model("multi-head", 384, candidates=K, seed=0)
    hist = train(model, data, CFG)
    # Step 0 is the untrained enhancer, i.e. cosine kNN (test above). With 465 training queries
    # the gain does not carry to the test split (as retrieval-data.md measured for 2k queries);
    # the full-size comparison is docs/memory-eval.md.
    assert hist.records[0]["step"] == 0
    assert hist.best_recall > hist.records[0]["val_recall@10"] + 0.01, hist.records
    val = ds.split["validation"]
    rel = [ds.relevant[i] for i in val]
    knn = per_query_metrics(knn_retriever(docs)(queries[val], 100), rel)["recall@10"].mean()
    enh = per_query_metrics(enhanced_retriever(docs, model)(queries[val], 100), rel)["recall@10"].mean()
    assert enh == pytest.approx(hist.best_recall) and enh > knn


def test_training_is_deterministic_and_round_trips(slice_data, tmp_path):
    _, docs, queries, data = slice_data
    cfg = TrainConfig(steps=30, batch_size=64, eval_every=15, seed=3)
    a, b = make_model("multi-head", 384, candidates=K, seed=0), make_model("multi-head", 384, candidates=K, seed=0)
    ha, hb = train(a, data, cfg), train(b, data, cfg)
    assert ha.records == hb.records
    for (n, p), (_, r) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, r), n
    a.save(tmp_path)
    loaded = load_enhancer(tmp_path)
    assert isinstance(loaded, QueryEnhancer) and loaded.config() == a.config()
    ids = data.cand_ids[:5]
    q, c, s = queries[:5], docs[ids.numpy()], data.cand_scores[:5].numpy()
    assert np.array_equal(loaded.refine(q, c, s), a.refine(q, c, s))
    assert not np.allclose(a.refine(q, c, s), q)  # training moved it away from the identity
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enhancer.json", "enhancer.safetensors"]


def test_linear_adapter_round_trip(tmp_path):
    ad = LinearAdapter(8)
    torch.nn.init.normal_(ad.linear.weight)
    ad.save(tmp_path)
    q = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert np.array_equal(load_enhancer(tmp_path).refine(q), ad.eval().refine(q))  # both run the folded plan


def test_bad_inputs(tmp_path):
    with pytest.raises(HeadwiseError, match="mechanism"):
        QueryEnhancer(32, mechanism="sparse")
    with pytest.raises(HeadwiseError, match="heads"):
        QueryEnhancer(30, heads=8)
    enh = QueryEnhancer(32, heads=4, candidates=4)
    q = np.zeros((2, 32), dtype=np.float32)
    with pytest.raises(HeadwiseError, match="queries"):
        enh.refine(np.zeros((2, 31), dtype=np.float32), np.zeros((2, 4, 32)), np.zeros((2, 4)))
    with pytest.raises(HeadwiseError, match="cand_vectors, cand_scores"):
        enh.refine(q, np.zeros((2, 4, 32)), np.zeros((2, 3)))
    with pytest.raises(HeadwiseError, match="NaN"):
        enh.refine(q, np.full((2, 4, 32), np.nan), np.zeros((2, 4)))
    with pytest.raises(HeadwiseError, match="flash"):
        QueryEnhancer(32, heads=4, mechanism="flash").refine(q)
    with pytest.raises(HeadwiseError, match="directory"):
        load_enhancer(tmp_path)
    (tmp_path / "enhancer.json").write_text('{"class": "Pickle"}')
    (tmp_path / "enhancer.safetensors").write_bytes(b"garbage")
    with pytest.raises(HeadwiseError, match="enhancer config"):
        load_enhancer(tmp_path)
