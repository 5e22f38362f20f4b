"""Corpus validation and the baselines' edges: no model needed, so these run in a second."""

from __future__ import annotations

import json

import pytest

from apexdsp.errors import ApexError, DataError
from apexdsp.indexes.corpus import load_corpus


def write(tmp_path, *lines: str):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def row(pid="a", title="Title", text="Some text."):
    return json.dumps({"id": pid, "title": title, "text": text})


def test_a_good_corpus_keeps_order_and_hash(tmp_path):
    corpus = load_corpus(write(tmp_path, row("a"), "", row("b", "T2", "More.")))
    assert [p.id for p in corpus.passages] == ["a", "b"] and corpus.pid_of("b") == 1
    assert corpus.texts() == ["Title | Some text.", "T2 | More."] and len(corpus.sha256) == 64


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ((), "is empty"),
        (("",), "is empty"),
        ((row("a"), row("a")), "line 2: field 'id' duplicates line 1"),
        ((row("a"), row("b", text="   ")), "line 2: field 'text' is empty"),
        ((row("a"), "{not json"), "line 2: not valid JSON"),
        (('{"id": "a", "title": "T"}',), "line 1: field 'text' missing"),
        (('{"id": "", "title": "T", "text": "x"}',), "line 1: field 'id' is empty"),
        (('{"id": "a", "title": "T", "text": 3}',), "line 1: field 'text' must be a string"),
        (("[1, 2]",), "line 1: expected a JSON object"),
    ],
)
def test_bad_corpus_lines_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(DataError, match=message) as error:
        load_corpus(write(tmp_path, *lines))
    assert "corpus.jsonl" in str(error.value)


def test_missing_corpus(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not a file"):
        load_corpus(tmp_path)


def test_bm25_baseline(tmp_path):
    from apexdsp.indexes.baselines import BM25Retriever

    corpus = load_corpus(write(tmp_path, row("a", "Paris", "Paris is the capital of France."),
                               row("b", "Berlin", "Berlin is the capital of Germany."),
                               row("c", "Cats", "Cats sleep a lot.")))
    bm25 = BM25Retriever(corpus)
    hits = bm25("capital of Germany", k=2)
    assert hits[0].pid == "b" and hits[0].rank == 1 and len(hits) == 2
    assert bm25("zebra quantum", k=3) == []  # no shared term: no hits, not arbitrary ones
    with pytest.raises(ApexError, match="empty query"):
        bm25("")
    assert [[h.pid for h in hs][:1] for hs in bm25(["Paris France", "cats sleep"], k=1)] == [["a"], ["c"]]


def dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_building_a_directory_is_all_or_nothing(tmp_path):
    from apexdsp.indexes.atomic import building

    target = tmp_path / "index"
    with building(target) as staging:
        (staging / "file").write_text("v1")
    assert (target / "file").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with building(target) as staging:
            (staging / "file").write_text("v2")
            raise RuntimeError("interrupted")
    assert (target / "file").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    with building(target) as staging:
        (staging / "file").write_text("v3")
    assert (target / "file").read_text() == "v3" and sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_leftovers_of_killed_builds_are_cleared_or_restored(tmp_path):
    from apexdsp.indexes.atomic import building

    target = tmp_path / "index"
    (tmp_path / f"index.tmp-{dead_pid()}").mkdir()  # a build killed while writing: removed
    earlier = tmp_path / f"index.old-{dead_pid()}"  # killed after moving the old index aside: restored
    earlier.mkdir()
    (earlier / "file").write_text("v0")
    (tmp_path / "index.tmp-mine").mkdir()  # not a pid: not ours to remove
    with building(target) as staging:
        assert (target / "file").read_text() == "v0"
        (staging / "file").write_text("v1")
    assert (target / "file").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "index.tmp-mine"]
