"""Every failure of every non-memory command: one line on stderr, exit status 2, no traceback (#19, item 9).

Each row of the table is a hostile input and a fragment of the message it must get. The
expensive entry points (model loading, every benchmark runner, the report's experiments)
are replaced by functions that fail the test if they are reached: every check must fire
before the work starts, so no row runs a model or a benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from headwise import cliutil
from headwise.cli import app
from headwise.cliutil import OneLineErrors, in_file, int_in, out_dir, out_file, read_text, reports_errors
from headwise.errors import HeadwiseError


class _ReachedError(Exception):
    """Raised by a stubbed expensive entry point: a pre-check did not fire first."""


@pytest.fixture
def no_work(monkeypatch):
    """Make every expensive entry point fail loudly (not with exit status 2) if it is reached."""
    import headwise.bench.analysis
    import headwise.bench.harness
    import headwise.bench.report
    import headwise.bench.train
    import headwise.pretrained
    import headwise.report.cli

    def reached(*args, **kwargs):
        raise _ReachedError("expensive work started before the arguments were checked")

    for module, name in [
        (headwise.pretrained, "load_minilm"),
        (headwise.bench.report, "run_kernels"),
        (headwise.bench.harness, "wait_for_quiet"),
        (headwise.bench.train, "train_all"),
        (headwise.bench.analysis, "main"),
        (headwise.report.cli, "_experiments"),
    ]:
        monkeypatch.setattr(module, name, reached)


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Hostile paths: a regular file, a binary file, Latin-1 text, a missing path, a folder."""
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat sat on the mat\n")
    binary = tmp_path / "docs.npy"
    binary.write_bytes(b"\x93NUMPY\x01\x00\x00binary")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café au lait\n".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"records": [{"impl": "a", "L": 8, "median_ms": 1.0}]}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"records": [{"impl": "b", "L": 8, "median_ms": 1.0}]}))
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"records": [{"impl": "a", "L": 8, "median_ms": 0}]}))
    return {
        "FILE": str(plain),
        "IN_FILE": str(plain / "sub"),
        "BIN": str(binary),
        "LATIN": str(latin),
        "BLANK": str(blank),
        "MISSING": str(tmp_path / "missing"),
        "DIR": str(tmp_path),
        "RESULT": str(result),
        "OTHER": str(other),
        "ZERO": str(zero),
    }


BIG = "2147483648"

# (arguments with placeholders from ``files``, a fragment of the expected message)
CASES = [
    # analyze: texts, sizes, model, output, selections, click's own parsing
    (["analyze"], "exactly one of them, got neither"),
    (["analyze", "--text", "x", "--file", "FILE"], "exactly one of them, got both"),
    (["analyze", "--text", ""], "--text: expected a non-empty text"),
    (["analyze", "--text", "   "], "--text: expected a non-empty text"),
    (["analyze", "--file", "MISSING"], "--file: expected an existing file"),
    (["analyze", "--file", "DIR"], "which is a directory"),
    (["analyze", "--file", "BIN"], "--file: expected a UTF-8 text file, got binary data"),
    (["analyze", "--file", "LATIN"], "bytes that are not UTF-8"),
    (["analyze", "--file", "BLANK"], "--file: expected at least one non-empty line"),
    (["analyze", "--text", "x", "--batch-size", "0"], "--batch-size: expected an integer in [1, 1024], got 0"),
    (["analyze", "--text", "x", "--batch-size", "-5"], "--batch-size: expected an integer in [1, 1024], got -5"),
    (["analyze", "--text", "x", "--batch-size", BIG], f"--batch-size: expected an integer in [1, 1024], got {BIG}"),
    (["analyze", "--text", "x", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
    (["analyze", "--text", "x", "--model", "no-such-model"], "--model: expected 'minilm' or a transformers model"),
    (["analyze", "--text", "x", "--model", "DIR"], "--model: expected 'minilm' or a transformers model"),
    (["analyze", "--text", "x", "--out", "FILE"], "--out: expected a directory (existing or new), got"),
    (["analyze", "--text", "x", "--out", "IN_FILE"], "inside the file"),
    (["analyze", "--text", "x", "--layers", "a-b"], "--layers: expected indices like '0,2,4-5'"),
    (["analyze", "--text", "x", "--layers", f"0-{BIG}"], "--layers: expected indices (or ascending ranges)"),
    (["analyze", "--text", "x", "--heads", "5-2"], "--heads: expected indices (or ascending ranges)"),
    (["analyze", "--text", "x", "--no-such-option"], "No such option: --no-such-option"),
    # demo
    (["demo", "--out", "FILE"], "--out: expected a directory (existing or new)"),
    (["demo", "--out", "IN_FILE"], "inside the file"),
    (["demo", "--seed", "-1"], "--seed: expected an integer in [0, 4294967295], got -1"),
    (["demo", "--seed", "18446744073709551616"], "--seed: expected an integer in [0, 4294967295]"),
    # docs
    (["docs", "--out", "DIR"], "--out: expected a file path, got"),
    (["docs", "--out", "BIN"], "--out: expected a UTF-8 text file, got binary data"),
    (["docs", "--out", "IN_FILE"], "--out: expected a directory (existing or new)"),
    # bench
    (["bench", "kernels", "--seq", "0"], "--seq: expected an integer in [1, 65536], got 0"),
    (["bench", "kernels", "--seq", "512", "--seq", BIG], f"--seq: expected an integer in [1, 65536], got {BIG}"),
    (["bench", "kernels", "--repeat", "0"], "--repeat: expected an integer in [1, 1000], got 0"),
    (["bench", "kernels", "--report", "FILE"], "--report: expected a directory (existing or new)"),
    (["bench", "kernels", "--compare", "MISSING"], "--compare: expected an existing file"),
    (["bench", "kernels", "--compare", "BIN"], "--compare: expected a readable JSON result"),
    (["bench", "kernels", "--compare", "ZERO"], "--compare: expected median_ms > 0"),
    (["bench", "kernels", "--threshold", "-0.5"], "--threshold: expected a relative slowdown >= 0"),
    (["bench", "kernels", "--threshold", "nan"], "--threshold: expected a relative slowdown >= 0"),
    (["bench", "modules", "--repeat", "-1"], "--repeat: expected an integer in [1, 1000]"),
    (["bench", "modules", "--report", "IN_FILE"], "inside the file"),
    (["bench", "train", "--steps", "0"], "--steps: expected an integer in [1, 10000], got 0"),
    (["bench", "train", "--steps", BIG], "--steps: expected an integer in [1, 10000]"),
    (["bench", "train", "--seed", "-3"], "--seed: expected an integer in [0, 4294967295]"),
    (["bench", "train", "--report", "FILE"], "--report: expected a directory"),
    (["bench", "components", "--seq", BIG], "--seq: expected an integer in [1, 65536]"),
    (["bench", "components", "--heads", "0"], "--heads: expected an integer in [1, 512], got 0"),
    (["bench", "components", "--embed", BIG], "--embed: expected an integer in [1, 8192]"),
    (["bench", "components", "--embed", "100", "--heads", "8"], "--embed: expected a multiple of --heads (8)"),
    (["bench", "analysis", "speed"], "suite: expected timing, memory or pruning, got 'speed'"),
    (["bench", "analysis", "timing", "--n-texts", "0"], "--n-texts: expected an integer in [1, 32884]"),
    (["bench", "analysis", "timing", "--repeat", "0"], "--repeat: expected an integer in [1, 1000]"),
    (["bench", "analysis", "memory", "--length", BIG], "--length: expected an integer in [1, 65536]"),
    (["bench", "analysis", "pruning", "--report", "FILE"], "--report: expected a directory"),
    (["bench", "all", "--memory-dir", "MISSING"], "--memory-dir: expected an existing directory"),
    (["bench", "all", "--memory-dir", "DIR"], "manifest.json, which does not exist"),
    (["bench", "all", "--repeat", "0"], "--repeat: expected an integer in [1, 1000]"),
    (["bench", "compare", "MISSING", "RESULT"], "OLD: expected an existing file"),
    (["bench", "compare", "RESULT", "BIN"], "NEW: expected a readable JSON result"),
    (["bench", "compare", "RESULT", "FILE"], "NEW: expected a readable JSON result"),
    (["bench", "compare", "RESULT", "OTHER"], "expected results with cases in common, got none"),
    (["bench", "compare", "RESULT", "RESULT", "--threshold", "-1"], "--threshold: expected a relative slowdown"),
    # the top level
    (["no-such-command"], "No such command 'no-such-command'"),
]


def _assert_one_line_error(result, fragment: str) -> None:
    """Exit 2, exactly one line ``error: ...`` on stderr holding ``fragment``, nothing on stdout."""
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {out!r} {result.exception!r}"
    assert "Traceback" not in out and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert result.stdout == "", f"stdout: {result.stdout!r}"


@pytest.mark.parametrize(("args", "fragment"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_every_failure_is_one_line_with_exit_status_2(args, fragment, files, no_work):
    argv = [files.get(a, a) for a in args]
    fragment = fragment.replace("FILE", files["FILE"])
    _assert_one_line_error(CliRunner().invoke(app, argv), fragment)


def test_an_error_raised_deep_inside_a_command_is_one_line(no_work, monkeypatch, tmp_path):
    """A HeadwiseError from deep inside (here, the model loader) is reported, not traced back."""
    import headwise.pretrained

    def deep(*args, **kwargs):
        raise HeadwiseError("tokenizer: expected a vocabulary,\n  got an empty file")

    monkeypatch.setattr(headwise.pretrained, "load_minilm", deep)
    result = CliRunner().invoke(app, ["analyze", "--text", "a cat", "--out", str(tmp_path / "new")])
    _assert_one_line_error(result, "error: tokenizer: expected a vocabulary, got an empty file")
    assert not (tmp_path / "new").exists()  # the check of --out creates nothing


def test_an_os_error_inside_a_command_is_one_line(monkeypatch, tmp_path):
    """An OSError (disk full, permission) while writing becomes '<file>: <reason>'."""
    import headwise.fileio

    def full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(headwise.fileio, "write_atomic", full)
    target = tmp_path / "attend.md"
    _assert_one_line_error(CliRunner().invoke(app, ["docs", "--out", str(target)]), "No space left on device")


def test_the_group_catches_what_a_command_does_not():
    """A command without @reports_errors under OneLineErrors still fails in one line."""
    group = typer.Typer(cls=OneLineErrors)

    @group.command()
    def boom() -> None:
        raise HeadwiseError("boom: expected\nnothing, got this")

    @group.command()
    def other() -> None:  # two commands: typer builds a group, not a single command
        pass

    _assert_one_line_error(CliRunner().invoke(group, ["boom"]), "error: boom: expected nothing, got this")


def test_a_bare_group_still_prints_its_help():
    result = CliRunner().invoke(app, ["bench"])
    assert "Traceback" not in result.output and "kernels" in result.output


def test_docs_and_compare_still_work(files, tmp_path):
    """The checks refuse only what is wrong: a new docs file and a comparison go through."""
    target = tmp_path / "sub" / "attend.md"
    assert CliRunner().invoke(app, ["docs", "--out", str(target)]).exit_code == 0
    assert "backend-table:begin" in target.read_text()
    same = CliRunner().invoke(app, ["bench", "compare", files["RESULT"], files["RESULT"]])
    assert same.exit_code == 0 and "1 cases compared" in same.stdout


# ---------------------------------------------------------------------------------------
# The helpers themselves (headwise.cliutil), importable without torch.


def test_cliutil_checks(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    assert out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and not (tmp_path / "a").exists()
    with pytest.raises(HeadwiseError, match="inside the file"):
        out_dir(f / "a" / "b")
    with pytest.raises(HeadwiseError, match="which is a directory"):
        out_file(tmp_path)
    with pytest.raises(HeadwiseError, match="which does not exist"):
        in_file(tmp_path / "nope", "--x")
    with pytest.raises(HeadwiseError, match=r"\[1, 3\], got True"):
        int_in("--n", True, 1, 3)
    (tmp_path / "t").write_bytes("é\n".encode())
    assert read_text(tmp_path / "t", "--x") == "é\n"


def test_fail_flattens_and_exits_2(capsys):
    with pytest.raises(typer.Exit) as exc:
        cliutil.fail(HeadwiseError("a\n\tb   c"))
    assert exc.value.exit_code == 2
    assert capsys.readouterr().err == "error: a b c\n"


def test_reports_errors_keeps_the_signature():
    def cmd(n: int = typer.Option(3, help="n")) -> None:
        """Doc."""

    wrapped = reports_errors(cmd)
    assert wrapped.__wrapped__ is cmd and wrapped.__doc__ == "Doc." and wrapped.__name__ == "cmd"


def test_cliutil_adds_no_heavy_import():
    """The memory commands will share it: beyond ``import headwise`` it needs typer alone."""
    import subprocess
    import sys

    code = (
        "import sys, headwise; before = set(sys.modules); import headwise.cliutil; "
        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    added = set(out.stdout.split())
    assert not added & {"transformers", "matplotlib", "faiss", "sklearn", "pyarrow"}, added


def test_paths_in_the_table_exist(files):
    assert Path(files["FILE"]).is_file() and not Path(files["MISSING"]).exists()
