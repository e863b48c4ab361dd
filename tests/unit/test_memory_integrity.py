"""#19: record checksums, verify(), SQLite errors as HeadwiseErrors, the schema-1 upgrade."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest
from typer.testing import CliRunner

from headwise import HeadwiseError
from headwise.memory import VectorMemory
from headwise.memory.cli import memory_app
from headwise.memory.integrity import record_checksum

#: Byte-flip trials (HEADWISE_FLIP_TRIALS=80 was run once: every trial an error or harmless).
FLIP_TRIALS = int(os.environ.get("HEADWISE_FLIP_TRIALS", "12"))


def _store(path, n=200, index="flat", save=True):
    rng = np.random.default_rng(0)
    mem = VectorMemory(8, path=path, index=index)
    ids = mem.add(rng.standard_normal((n, 8)).astype(np.float32), metadata=[{"i": i} for i in range(n)],
                  texts=[f"record {i}" for i in range(n)])  # fmt: skip
    originals = {int(r.id): (r.vector.copy(), r.metadata, r.text) for r in mem.get(ids)}
    if save:
        mem.save()
    mem.close()
    return originals


@pytest.mark.parametrize("seed", range(FLIP_TRIALS))
def test_a_flipped_byte_is_an_error_or_harmless_never_a_wrong_record(tmp_path, seed):
    path = tmp_path / "s"
    originals = _store(path)
    db = path / "memory.sqlite"
    data = bytearray(db.read_bytes())
    rng = np.random.default_rng(seed)
    pos = int(rng.integers(4096, len(data)))  # past the header page: record pages and free space
    data[pos] ^= 1 << int(rng.integers(0, 8))
    db.write_bytes(bytes(data))
    try:
        mem = VectorMemory.open(path, rebuild_index=True)
    except HeadwiseError:
        return  # refused at open (quick_check, a checksum during the rebuild): the store is not served
    try:
        report = mem.verify()
        for rid, (vec, meta, text) in originals.items():
            try:
                record = mem.get([rid])[0]
            except HeadwiseError as exc:
                assert "checksum" in str(exc) or "database" in str(exc)
                assert not report.ok
                continue
            if record is None:  # a flipped key bit can move a record out of reach: verify saw it
                assert not report.ok
                continue
            same = np.array_equal(record.vector, vec) and record.metadata == meta and record.text == text
            assert same or not report.ok  # a differing record is never served as if intact
            if not same:
                raise AssertionError(f"record {rid} served with corrupted bytes")
    except HeadwiseError:
        pass  # any SQLite error surfaces as a HeadwiseError, never a raw sqlite3 error
    finally:
        mem.close()


def test_verify_finds_a_corrupted_record_and_an_index_that_disagrees(tmp_path):
    path = tmp_path / "s"
    _store(path)
    with VectorMemory.open(path) as mem:
        assert mem.verify().ok and mem.verify().records == 200
    with sqlite3.connect(path / "memory.sqlite") as conn:  # bytes changed behind the checksum's back
        conn.execute("UPDATE records SET text = 'forged' WHERE id = 3")
        # and a vector rewritten *with* a matching checksum: only the index comparison can see it
        vec = np.ones(8, dtype=np.float32) / np.sqrt(8)
        meta, text = conn.execute("SELECT metadata, text FROM records WHERE id = 5").fetchone()
        conn.execute("UPDATE records SET vector = ?, checksum = ? WHERE id = 5",
                     (vec.tobytes(), record_checksum(vec.tobytes(), meta, text)))  # fmt: skip
    with VectorMemory.open(path, read_only=True) as mem:
        report = mem.verify()
        assert not report.ok and report.corrupt == [3] and report.index_differs == [5]
        with pytest.raises(HeadwiseError, match="expected record 3 to match its checksum"):
            mem.get([3])
        assert mem.get([4])[0].text == "record 4"
    result = CliRunner().invoke(memory_app, ["verify", str(path)], terminal_width=200)
    assert result.exit_code == 2 and "checksum mismatches" in result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: verify")


def test_verify_cli_on_an_intact_store(tmp_path):
    _store(tmp_path / "s", index="hnsw-fp16")
    result = CliRunner().invoke(memory_app, ["verify", str(tmp_path / "s")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "200" in result.output


def test_a_schema_1_store_is_upgraded_by_its_first_writer(tmp_path):
    path = tmp_path / "s"
    originals = _store(path)
    with sqlite3.connect(path / "memory.sqlite") as conn:
        conn.execute("ALTER TABLE records DROP COLUMN checksum")
        conn.execute("PRAGMA user_version=1")
    with VectorMemory.open(path, read_only=True) as reader:
        report = reader.verify()
        assert report.ok and report.unchecked == 200
    with VectorMemory.open(path) as mem:
        assert mem.verify().unchecked == 0 and mem.verify().ok
        assert mem.get([7])[0].text == originals[7][2]
    with sqlite3.connect(path / "memory.sqlite") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2


def test_sqlite_errors_name_the_file(tmp_path):
    path = tmp_path / "s"
    _store(path, save=False)
    mem = VectorMemory.open(path)
    mem._db.conn.execute("DROP TABLE records")  # a damaged schema behind the store's back
    with pytest.raises(HeadwiseError, match=r"database .*memory.sqlite.*no such table"):
        mem.get([1])
    with pytest.raises(HeadwiseError, match="database"):
        mem.add(np.ones((1, 8)))
    mem.close()
