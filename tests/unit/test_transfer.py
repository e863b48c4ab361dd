"""Query files and the transfer query sets (memory.transfer, data.dictd)."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest
from tests.conftest import require_data

from headwise import HeadwiseError
from headwise.data.dictd import decode_number, dictd_available, read_dictd
from headwise.data.wordnet import wordnet_available
from headwise.memory.transfer import (
    SOURCES,
    _devil_definition,
    _foldoc_definition,
    build_transfer_set,
    definition_opening,
    read_query_file,
    transfer_files,
    without_headword,
    write_query_file,
)

DOC_IDS = ["n001", "n002", "v003"]


def test_dictd_numbers():
    assert decode_number("A") == 0 and decode_number("/") == 63 and decode_number("BA") == 64
    with pytest.raises(HeadwiseError, match="base-64"):
        decode_number("B!")


def test_definition_cleaning():
    foldoc = (
        "cisc\n\n   1. <processor> /sisk/ (CISC) A {processor} where each\n   instruction can do a lot.\n\n"
        "   (1995-01-01)\n"
    )
    assert _foldoc_definition(foldoc) == "(CISC) A processor where each instruction can do a lot."
    assert without_headword(_foldoc_definition(foldoc), "cisc") == "A processor where each instruction can do a lot."
    devil = "DAY, n.  A period of twenty-four hours, mostly misspent.  This period\nis divided.\n\n"
    assert _devil_definition(devil) == "A period of twenty-four hours, mostly misspent. This period is divided."
    verse = "DEAD, adj.\n\n    Done with the work of breathing; done\n"
    assert _devil_definition(verse) == "Done with the work of breathing; done"
    assert _devil_definition("no header here") == ""
    assert definition_opening("Short. " * 3 + "Long " * 100, 10, 30) == "Short. Short."
    assert without_headword("Buses and a bus-stop: the bus.", "bus") == "and a bus-stop: the."


def test_query_file_round_trip(tmp_path):
    rows = [{"query": "a thing", "relevant": ["n002"]}, {"query": "an act", "relevant": {"v003": 2, "n001": 1}}]
    for name in ("q.jsonl", "q.jsonl.gz"):
        digest = write_query_file(tmp_path / name, rows)
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        qf = read_query_file(tmp_path / name, DOC_IDS)
        assert qf.queries == ["a thing", "an act"] and qf.relevant == [{1: 1}, {2: 2, 0: 1}] and qf.name == "q"
    # identical rows, identical bytes (gzip without a timestamp)
    assert write_query_file(tmp_path / "again.jsonl.gz", rows) == write_query_file(tmp_path / "q.jsonl.gz", rows)


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2: expected a JSON object"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"query": "", "relevant": ["n001"]}', "line 2: query"),
        ('{"query": "x", "relevant": []}', "line 2: relevant"),
        ('{"query": "x", "relevant": ["n999"]}', "doc ids of the corpus"),
        ('{"query": "x", "relevant": {"n001": 0}}', "a grade > 0"),
        ('{"query": "x", "relevant": {"n001": true}}', "a grade > 0"),
    ],
)
def test_query_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "fine", "relevant": ["n001"]}) + "\n" + line + "\n")
    with pytest.raises(HeadwiseError, match=message):
        read_query_file(path, DOC_IDS)


def test_query_file_missing_empty_or_binary(tmp_path):
    with pytest.raises(HeadwiseError, match="existing JSONL"):
        read_query_file(tmp_path / "none.jsonl", DOC_IDS)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HeadwiseError, match="at least one query"):
        read_query_file(tmp_path / "empty.jsonl", DOC_IDS)
    (tmp_path / "bin.jsonl.gz").write_bytes(b"\x00\xff not gzip")
    with pytest.raises(HeadwiseError, match="readable UTF-8 JSONL"):
        read_query_file(tmp_path / "bin.jsonl.gz", DOC_IDS)


@pytest.mark.data
def test_committed_transfer_sets_rebuild_byte_for_byte(tmp_path):
    """The builder, run on today's Debian packages, reproduces the committed files exactly."""
    require_data(wordnet_available(), "WordNet (wordnet-base)")
    require_data(all(dictd_available(s) for s in SOURCES), "dict-foldoc and dict-devil")
    from headwise.data.wordnet import load_synsets

    synsets = load_synsets()
    keys = {s.key for s in synsets}
    for path, source in zip(transfer_files(), SOURCES):
        rows = build_transfer_set(source, synsets)
        digest = write_query_file(tmp_path / path.name, rows)
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest(), f"{path.name} differs from its rebuild"
        with gzip.open(path, "rt") as fh:
            committed = [json.loads(line) for line in fh]
        assert len(committed) >= 500
        assert all(set(r["relevant"]) <= keys and r["headword"] not in r["query"].lower().split() for r in committed)
    assert len(read_dictd("devil")) > 900
