"""record_feedback / feedback(): pairs committed to the store's SQLite, checked, and trained on."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from typer.testing import CliRunner

from headwise import HeadwiseError
from headwise.memory import VectorMemory
from headwise.memory.cli import memory_app
from headwise.memory.feedback import feedback_training_set
from headwise.memory.fit import load_saved_enhancer

runner = CliRunner()


def _store(path, n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    mem = VectorMemory(d, path=path)
    ids = mem.add(rng.standard_normal((n, d)).astype(np.float32))
    return mem, ids, rng


def test_feedback_is_durable_and_read_back(tmp_path):
    mem, ids, rng = _store(tmp_path / "s")
    q = rng.standard_normal(16).astype(np.float32)
    assert mem.feedback() == []  # no table until the first pair
    first = mem.record_feedback(q, [int(ids[3]), int(ids[5])])
    second = mem.record_feedback(q * 1e-30, {int(ids[7]): 3})
    mem.close()  # no save(): each pair is committed when record_feedback returns
    back = VectorMemory.open(tmp_path / "s")
    got = back.feedback()
    assert [f.id for f in got] == [first, second]
    assert got[0].relevant == {int(ids[3]): 1.0, int(ids[5]): 1.0} and got[1].relevant == {int(ids[7]): 3.0}
    np.testing.assert_allclose(got[0].query, q / np.linalg.norm(q), rtol=1e-6)  # cosine: stored normalised
    assert got[0].text is None and got[0].created <= got[1].created
    back.delete([int(ids[3])])
    queries, relevant = feedback_training_set(back)
    assert queries.shape == (2, 16) and relevant[0] == {int(ids[5]): 1.0}  # the deleted id is dropped
    back.delete([int(ids[7])])
    assert len(feedback_training_set(back)[1]) == 1  # a pair with no stored id left is skipped


@pytest.mark.parametrize(
    "query,relevant,match",
    [
        (np.ones(16), [], "relevant_ids: expected at least one id"),
        (np.ones(16), [10_000], "not stored"),
        (np.ones(16), ["3"], "integer ids"),
        (np.ones(16), [2**63], r"integer ids in \[0, 2\*\*63 - 1\)"),
        (np.ones(16), {3: 0}, "grade > 0"),
        (np.ones(16), {3: float("inf")}, "finite grade"),
        (np.ones(16), "3", "a list of stored ids"),
        (np.ones(15), [3], "query: expected shape"),
        (np.ones((2, 16)), [3], "query: expected one query"),
        (np.full(16, np.nan), [3], "finite"),
        ("some text", [3], "encoder"),
    ],
)
def test_bad_feedback_gets_a_clear_error_and_writes_nothing(tmp_path, query, relevant, match):
    mem, _, _ = _store(tmp_path / "s", n=10)
    with pytest.raises(HeadwiseError, match=match):
        mem.record_feedback(query, relevant)
    assert mem.feedback() == []


def test_text_queries_keep_their_text(tmp_path):
    class Hash:  # a deterministic stand-in encoder: the store only needs dim and encode
        dim = 16

        def encode(self, texts):
            return np.stack([np.random.default_rng(len(t)).standard_normal(16) for t in texts]).astype(np.float32)

    mem = VectorMemory(16, encoder=Hash())
    ids = mem.add(np.eye(16, dtype=np.float32))
    mem.record_feedback("which axis?", [int(ids[2])])
    (entry,) = mem.feedback()
    assert entry.text == "which axis?" and entry.query.shape == (16,)


def test_train_from_feedback_cli(tmp_path):
    mem, ids, rng = _store(tmp_path / "s", n=300)
    A = np.eye(16, dtype=np.float32) + 1.5 * rng.standard_normal((16, 16)).astype(np.float32) / 4
    targets = ids[:120]
    for i in targets:  # an agent's feedback: a distorted view of the document answered it
        mem.record_feedback(mem.vectors([int(i)])[0] @ A, [int(i)])
    mem.save()
    mem.close()
    args = ["train", "--from-feedback", str(tmp_path / "s"), "--method", "linear", "--steps", "80",
            "--batch-size", "32", "--eval-every", "20", "--lr", "0.01"]  # fmt: skip
    result = runner.invoke(memory_app, args, catch_exceptions=False, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "120 feedback pairs" in result.output and (tmp_path / "s" / "enhancer" / "history.json").is_file()
    back = VectorMemory.open(tmp_path / "s")
    load_saved_enhancer(back)
    queries, relevant = feedback_training_set(back)
    hit = lambda found: np.mean([t in row for t, row in zip(targets, found)])  # noqa: E731
    assert hit(back.search(queries, 10)[1]) > hit(back.search(queries, 10, enhance=False)[1])


@pytest.mark.parametrize(
    "extra,match",
    [
        ([], "at least 2 recorded feedback pairs"),
        (["--method", "moe"], "one --method, linear or multi-head"),
        (["--dir", "x"], "exactly one of them"),
    ],
)
def test_train_from_feedback_errors(tmp_path, extra, match):
    mem, _, _ = _store(tmp_path / "s", n=10)
    mem.close()
    result = runner.invoke(memory_app, ["train", "--from-feedback", str(tmp_path / "s"), *extra], terminal_width=300)
    assert result.exit_code == 2 and match in result.output and "Traceback" not in result.output


def test_a_store_without_the_table_is_read_by_sql_only(tmp_path):
    mem, ids, _ = _store(tmp_path / "s", n=5)
    mem.record_feedback(np.ones(16), [int(ids[0])])
    mem.close()
    with sqlite3.connect(tmp_path / "s" / "memory.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 1
