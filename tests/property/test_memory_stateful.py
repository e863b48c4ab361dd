"""#19: a stateful fuzzer drives VectorMemory against a plain Python model of it.

Hypothesis's ``RuleBasedStateMachine`` draws sequences of add / delete / upsert /
update_metadata / search / filtered search / get / save / close+reopen / reader refresh on
flat, hnsw and hnsw-fp16 stores, and checks every step against a dict of id -> (vector,
metadata, text): get() returns exactly the model's record, len() and ids() match, flat search
equals exact numpy search, an HNSW search finds each stored vector itself, a filtered search
returns min(k, matching) matching records (on flat, the exact top-k among them), and a
read-only reader agrees with the model after ``refresh()`` (upsert, update_metadata and the
filtered search since #20). CI runs ``HEADWISE_FUZZ_EXAMPLES`` (default 25) sequences per index
kind; the longer run in docs/memory.md set it to 1000.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from headwise import HeadwiseError
from headwise.memory import VectorMemory

DIM = 6
EXAMPLES = int(os.environ.get("HEADWISE_FUZZ_EXAMPLES", "25"))
ids_strategy = st.integers(min_value=0, max_value=40)
STEPS = [0]  # steps checked in this process (printed by the long run, see docs/memory.md)


def vector_of(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)  # cosine stores normalised vectors: the model keeps them so


class MemoryMachine(RuleBasedStateMachine):
    index_kind = "flat"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="hw-fuzz-"))
        self.mem = VectorMemory(DIM, index=self.index_kind, path=self.dir / "s", hnsw_m=8, ef_search=64)
        self.reader: VectorMemory | None = None
        self.model: dict[int, tuple[np.ndarray, object, str | None]] = {}
        self.seed = 0

    def teardown(self) -> None:
        for m in (self.mem, self.reader):
            if m is not None:
                m.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ writes
    @rule(ids=st.lists(ids_strategy, min_size=1, max_size=5, unique=True), auto=st.booleans(),
          with_text=st.booleans())  # fmt: skip
    def add(self, ids, auto, with_text):
        vecs = np.stack([vector_of(self.seed + j) for j in range(len(ids))])
        self.seed += len(ids)
        meta = [{"n": i} for i in ids]
        texts = [f"t{i}" if with_text else None for i in ids]
        if auto:
            got = self.mem.add(vecs, metadata=meta, texts=texts)
            assert len(set(got.tolist()) & set(self.model)) == 0  # fresh ids
            ids = got.tolist()
        elif set(ids) & set(self.model):
            with pytest.raises(HeadwiseError, match="already stored"):
                self.mem.add(vecs, ids=ids, metadata=meta, texts=texts)
            return
        else:
            assert self.mem.add(vecs, ids=ids, metadata=meta, texts=texts).tolist() == ids
        for i, v, m, t in zip(ids, vecs, meta, texts):
            self.model[int(i)] = (v, m, t)

    @rule(ids=st.lists(ids_strategy, max_size=4))
    def delete(self, ids):
        expected = len(set(ids) & set(self.model))
        assert self.mem.delete(ids) == expected
        for i in ids:
            self.model.pop(i, None)

    @rule(ids=st.lists(ids_strategy, min_size=1, max_size=4, unique=True), g=st.integers(0, 2))
    def upsert(self, ids, g):
        vecs = np.stack([vector_of(self.seed + j) for j in range(len(ids))])
        self.seed += len(ids)
        meta, texts = [{"n": i, "g": g} for i in ids], [f"u{i}" for i in ids]
        assert self.mem.upsert(vecs, ids=ids, metadata=meta, texts=texts).tolist() == ids
        for i, v, m, t in zip(ids, vecs, meta, texts):
            self.model[int(i)] = (v, m, t)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), g=st.integers(0, 2), merge=st.booleans())
    def update_metadata(self, data, g, merge):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=3, unique=True))
        self.mem.update_metadata(ids, [{"g": g}] * len(ids), merge=merge)
        for i in ids:
            v, m, t = self.model[i]
            self.model[i] = (v, {**m, "g": g} if merge else {"g": g}, t)

    @rule()
    def save(self):
        self.mem.save()

    @rule()
    def reopen(self):
        self.mem.close()
        self.mem = VectorMemory.open(self.dir / "s", lock_timeout=0)

    @rule()
    def open_or_refresh_reader(self):
        if self.reader is None:
            self.reader = VectorMemory.open(self.dir / "s", read_only=True)
        else:
            self.reader.refresh()
        self._check_store(self.reader)

    # ------------------------------------------------------------------ reads
    @rule(i=ids_strategy)
    def get(self, i):
        (record,) = self.mem.get([i])
        if i not in self.model:
            assert record is None
            return
        v, m, t = self.model[i]
        np.testing.assert_allclose(record.vector, v, rtol=1e-6, atol=1e-7)
        assert (record.metadata, record.text) == (m, t)

    @precondition(lambda self: self.model)
    @rule(k=st.integers(min_value=1, max_value=8), data=st.data())
    def search(self, k, data):
        i = data.draw(st.sampled_from(sorted(self.model)))
        q = self.model[i][0]
        scores, ids = self.mem.search(q, k)
        assert ids.shape == (1, k)
        found = [x for x in ids[0].tolist() if x >= 0]
        assert set(found) <= set(self.model) and len(found) == len(set(found))
        if self.index_kind == "flat":
            ranked = sorted(self.model, key=lambda j: (-float(self.model[j][0] @ q), j))
            exact = {j: float(self.model[j][0] @ q) for j in self.model}
            assert len(found) == min(k, len(self.model))
            # equal up to ties: the scores of the returned ids are the top-k exact scores
            np.testing.assert_allclose(sorted((exact[j] for j in found), reverse=True),
                                       [exact[j] for j in ranked[: len(found)]], rtol=1e-5, atol=1e-6)  # fmt: skip
        else:
            assert found and exact_self(found, i, self.model)

    @precondition(lambda self: self.model)
    @rule(k=st.integers(min_value=1, max_value=8), g=st.integers(0, 2), which=st.integers(0, 3), data=st.data())
    def filtered_search(self, k, g, which, data):
        wheres = [{"g": g}, {"g": {"$ne": g}}, {"n": {"$lt": 20}}, {"$or": [{"g": g}, {"n": {"$gte": 30}}]}]
        tests = [
            lambda m: m.get("g") == g,
            lambda m: m.get("g") != g,
            lambda m: "n" in m and m["n"] < 20,
            lambda m: m.get("g") == g or ("n" in m and m["n"] >= 30),
        ]
        matching = {i for i, (_, m, _) in self.model.items() if tests[which](m)}
        q = self.model[data.draw(st.sampled_from(sorted(self.model)))][0]
        _, ids = self.mem.search(q, k, filter=wheres[which])
        found = [x for x in ids[0].tolist() if x >= 0]
        assert set(found) <= matching and len(found) == len(set(found)) == min(k, len(matching))
        if self.index_kind == "flat" and found:
            exact = sorted((float(self.model[j][0] @ q) for j in matching), reverse=True)[: len(found)]
            np.testing.assert_allclose(sorted((float(self.model[j][0] @ q) for j in found), reverse=True), exact,
                                       rtol=1e-5, atol=1e-6)  # fmt: skip

    @invariant()
    def counts_agree(self):
        STEPS[0] += 1
        self._check_store(self.mem)

    def _check_store(self, mem: VectorMemory) -> None:
        assert len(mem) == len(self.model)
        assert sorted(mem.ids().tolist()) == sorted(self.model)


def exact_self(found: list[int], i: int, model: dict) -> bool:
    """An HNSW search of a stored vector returns it (or an identical vector) first."""
    return found[0] == i or np.allclose(model[found[0]][0], model[i][0], atol=1e-3)


def _machine(kind: str):
    cls = type(f"MemoryMachine_{kind.replace('-', '_')}", (MemoryMachine,), {"index_kind": kind})
    cls.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    return cls.TestCase


TestFlat = _machine("flat")
TestHNSW = _machine("hnsw")
TestHNSWFp16 = _machine("hnsw-fp16")
