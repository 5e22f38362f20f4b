"""``apexdsp data stats``: the table, ``--json``, and one-line errors for bad files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from apexdsp.cli import data_cmd
from apexdsp.data.loaders import file_sha256
from apexdsp.errors import DataError

runner = CliRunner()


def test_stats_json_for_questions(data_dir):
    path = data_dir / "hotpotqa" / "dev.jsonl"
    result = runner.invoke(data_cmd.app, ["stats", str(path), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["file"] == str(path) and stats["sha256"] == file_sha256(path)
    assert stats["kind"] == "questions" and stats["count"] == 300
    assert stats["types"] == {"bridge": 198, "comparison": 52, "unknown": 50}
    assert set(stats["answer_tokens"]) == {"mean", "median", "min", "max"}
    assert 0 < stats["yes_no_share"] < 1


def test_stats_json_for_a_corpus(data_dir):
    result = runner.invoke(data_cmd.app, ["stats", str(data_dir / "hotpotqa" / "corpus.jsonl"), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["kind"] == "corpus" and stats["count"] == 15_317
    assert 15_000 < stats["unique_titles"] <= 15_317
    assert stats["text_words"]["mean"] > 10


def test_stats_table_for_musique(data_dir):
    result = runner.invoke(data_cmd.app, ["stats", str(data_dir / "musique" / "train.jsonl")])
    assert result.exit_code == 0, result.output
    assert "questions" in result.output and "100" in result.output
    assert "2hop 68 (68%)" in result.output
    assert "100 / 0" in result.output  # with / without decomposition


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read {path}: No such file or directory"),
        ('{"id": "q1", "question": "Who?", "answer": "x"}\n{"id": "q2",\n', "{path} line 2: not valid JSON"),
        ('{"id": "q1", "question": "Who?"}\n', "{path} line 1: field 'answer' missing"),
        ('{"id": "q1", "answer": "x"}\n', "{path} line 1: field 'question' missing"),
    ],
)
def test_bad_files_raise_a_data_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(data_cmd.app, ["stats", str(path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, DataError)
    assert str(result.exception).startswith(message.format(path=path))
    assert "\n" not in str(result.exception)


def test_root_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from apexdsp.cli.app import main

    path = tmp_path / "dev.jsonl"
    path.write_text('{"id": "q1", "question": "Who?"}\n')
    assert main(["data", "stats", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert " ".join(err.split()) == f"error: {path} line 1: field 'answer' missing"
    assert main(["data", "stats", str(tmp_path / "dev.jsonl"), "--json"]) == 2


def test_console_script_stats_json(data_dir):
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(sys.executable).parent / "apexdsp")
    path = data_dir / "2wikimultihopqa" / "train.jsonl"
    result = subprocess.run([script, "data", "stats", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["count"] == 500
