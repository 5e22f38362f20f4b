"""Data loading: the real shared files, every bad-input message, hub-shaped rows, dspy.Example conversion."""

from __future__ import annotations

import hashlib
import json

import pytest

from apexdsp.data import (
    Passage,
    Question,
    file_sha256,
    iter_corpus,
    load_questions,
    read_corpus,
    read_questions,
)
from apexdsp.data.examples import to_example, to_examples
from apexdsp.data.hub import (
    HUB_DATASETS,
    from_2wikimultihopqa,
    from_bamboogle,
    from_hotpotqa,
    from_musique,
    join_sentences,
    map_rows,
)
from apexdsp.data.stats import corpus_stats, detect_kind, question_stats
from apexdsp.errors import ApexError, DataError

GOOD = {"id": "q1", "question": "Who?", "answer": "Me"}


def write_lines(path, lines: list[str | dict]) -> str:
    path.write_bytes(
        b"".join((json.dumps(line) if isinstance(line, dict) else line).encode() + b"\n" for line in lines)
    )
    return str(path)


# --- the real shared files ------------------------------------------------------------------------


def test_shared_question_files_load(data_dir):
    dev = read_questions(data_dir / "hotpotqa" / "dev.jsonl")
    assert len(dev) == 300
    assert len({q.id for q in dev}) == 300
    assert all(len(q.supporting_titles) == 2 for q in dev)
    assert len(read_questions(data_dir / "hotpotqa" / "train.jsonl")) == 1279
    assert len(read_questions(data_dir / "2wikimultihopqa" / "train.jsonl")) == 500
    musique = read_questions(data_dir / "musique" / "train.jsonl")
    assert len(musique) == 100
    assert all(q.decomposition and len(q.decomposition) >= 2 for q in musique)
    assert musique[0].answers == ["G. Stanley Hall", "Stanley Hall"]


def test_shared_corpus_loads(data_dir):
    corpus = read_corpus(data_dir / "hotpotqa" / "corpus.jsonl")
    assert len(corpus) == 15_317
    assert isinstance(corpus[0], Passage) and corpus[0].id == "hotpotqa-0"
    assert sum(1 for _ in iter_corpus(data_dir / "musique" / "corpus.jsonl")) == 1890


def test_read_questions_limit_stops_early(tmp_path, data_dir):
    assert [q.id for q in read_questions(data_dir / "hotpotqa" / "dev.jsonl", limit=3)] == [
        q.id for q in read_questions(data_dir / "hotpotqa" / "dev.jsonl")[:3]
    ]
    # Lines after the limit are not read, so a broken tail does not matter.
    path = write_lines(tmp_path / "q.jsonl", [GOOD, "{broken"])
    assert len(read_questions(path, limit=1)) == 1
    assert read_questions(path, limit=0) == []


def test_blank_lines_are_skipped_and_still_counted(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", ["", GOOD, "   ", {"id": "q2", "question": "Why?"}])
    with pytest.raises(DataError) as error:
        read_questions(path)
    assert str(error.value) == f"{path} line 4: field 'answer' missing"
    assert len(read_questions(write_lines(tmp_path / "ok.jsonl", ["", GOOD, "  \t"]))) == 1


# --- bad input: one line naming file, line and field ---------------------------------------------


def test_missing_file_named_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^cannot read nowhere/dev\.jsonl: No such file or directory$"):
        read_questions("nowhere/dev.jsonl")
    with pytest.raises(DataError, match=r"^cannot read nowhere\.jsonl: No such file or directory$"):
        file_sha256("nowhere.jsonl")


def test_directory_is_not_readable_as_data(tmp_path):
    with pytest.raises(DataError, match=r"^cannot read .*: Is a directory$"):
        read_corpus(tmp_path)


@pytest.mark.parametrize(("unreadable", "reason"), [("secret.jsonl", "Is a directory"),
                                                    ("file.jsonl/secret.jsonl", "Not a directory")])
def test_unreadable_file(tmp_path, unreadable, reason):
    """Paths that no user can read, root included: a folder named like a file, a file inside a file."""
    (tmp_path / "secret.jsonl").mkdir()
    write_lines(tmp_path / "file.jsonl", [GOOD])
    path = tmp_path / unreadable
    with pytest.raises(DataError, match=rf"^cannot read .*secret\.jsonl: {reason}$"):
        read_questions(path)
    with pytest.raises(DataError, match=rf"^cannot read .*secret\.jsonl: {reason}$"):
        file_sha256(path)


def test_malformed_json_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "dev.jsonl", [GOOD, {**GOOD, "id": "q2"}, '{"id": "q3" "question": "x"}'])
    with pytest.raises(DataError) as error:
        read_questions("dev.jsonl")
    assert str(error.value) == "dev.jsonl line 3: not valid JSON (Expecting ',' delimiter at column 13)"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "q", "question": "Who?"}, "field 'answer' missing"),
        ({"id": "q", "answer": "Me"}, "field 'question' missing"),
        ({"question": "Who?", "answer": "Me"}, "field 'id' missing"),
        ({"id": "q", "question": "   ", "answer": "Me"}, "field 'question' invalid (question is blank)"),
        ({"id": "q", "question": "Who?", "answer": 7}, "field 'answer' invalid (Input should be a valid string)"),
        ({"id": "q", "answer": 7}, "field 'question' missing (and 1 more problem)"),
        ({**GOOD, "paragraphs": [{"title": "T"}]}, "field 'paragraphs[0].text' missing"),
        ({**GOOD, "decomposition": [{"answer": "x"}]}, "field 'decomposition[0].question' missing"),
    ],
)
def test_invalid_question_records(tmp_path, monkeypatch, record, message):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "dev.jsonl", [{**GOOD, "id": "ok"}, record])
    with pytest.raises(DataError) as error:
        read_questions("dev.jsonl")
    assert str(error.value) == f"dev.jsonl line 2: {message}"


def test_not_an_object_bad_utf8_duplicate_id(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(DataError, match=r"a\.jsonl line 2: expected a JSON object, got list$"):
        read_questions(path)
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n" * 3 + b'{"id": "\xff"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl line 4: not valid UTF-8"):
        read_questions(bad)
    path = write_lines(tmp_path / "c.jsonl", [GOOD, {**GOOD, "id": "q2"}, GOOD])
    with pytest.raises(DataError, match=r"c\.jsonl line 3: field 'id' duplicates line 1 \('q1'\)$"):
        read_questions(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert read_questions(path)[0].id == "q1"


def test_invalid_corpus_record(tmp_path):
    path = write_lines(tmp_path / "corpus.jsonl", [{"id": "p1", "title": "T", "text": "x"}, {"id": "p2", "title": "T"}])
    with pytest.raises(DataError, match=r"corpus\.jsonl line 2: field 'text' missing$"):
        read_corpus(path)


def test_errors_are_user_errors_with_exit_code_2():
    assert issubclass(DataError, ApexError) and DataError.exit_code == 2


# --- sha256, load_questions ----------------------------------------------------------------------


def test_file_sha256_streams_the_whole_file(tmp_path, data_dir):
    path = data_dir / "musique" / "train.jsonl"
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path, chunk_size=4096) == file_sha256(path)


def test_load_questions_from_path(data_dir):
    questions = load_questions(data_dir / "hotpotqa" / "dev.jsonl", limit=5)
    assert len(questions) == 5
    with pytest.raises(DataError, match="split 'train' applies to hub datasets only"):
        load_questions(data_dir / "hotpotqa" / "dev.jsonl", split="train")


def test_load_questions_from_the_hub_fails_clearly_offline(tmp_path):
    # An empty datasets cache and offline mode (conftest): datasets must refuse, we must say why.
    with pytest.raises(ApexError) as error:
        load_questions("hotpotqa", limit=3, cache_dir=tmp_path / "hf")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot load hub dataset hotpotqa (hotpotqa/hotpot_qa, split validation)")
    assert "hub is unreachable" in message and "pass a JSONL file" in message


# --- hub-shaped rows ------------------------------------------------------------------------------

HOTPOT_ROW = {
    "id": "5a8b57f25542995d1e6f1371",
    "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
    "answer": "yes",
    "type": "comparison",
    "level": "hard",
    "supporting_facts": {"title": ["Scott Derrickson", "Ed Wood", "Ed Wood"], "sent_id": [0, 0, 1]},
    "context": {
        "title": ["Ed Wood (film)", "Scott Derrickson", "Ed Wood"],
        "sentences": [
            ["Ed Wood is a 1994 American biographical period comedy-drama film.", " It stars Johnny Depp."],
            ["Scott Derrickson (born July 16, 1966) is an American director.", " He lives in Los Angeles."],
            ["Edward Davis Wood Jr. was an American filmmaker.", " He made low-budget films."],
        ],
    },
}


def test_hotpotqa_row():
    question = from_hotpotqa(HOTPOT_ROW)
    assert question.id == "5a8b57f25542995d1e6f1371"
    assert (question.answer, question.type, question.level) == ("yes", "comparison", "hard")
    assert question.supporting_titles == ["Ed Wood", "Scott Derrickson"]
    assert [p.title for p in question.paragraphs] == ["Ed Wood (film)", "Scott Derrickson", "Ed Wood"]
    assert [p.is_supporting for p in question.paragraphs] == [False, True, True]
    # HotpotQA sentences carry their leading space: the paragraph is rebuilt exactly.
    assert question.paragraphs[1].text == (
        "Scott Derrickson (born July 16, 1966) is an American director. He lives in Los Angeles."
    )
    assert question.decomposition is None


def test_2wikimultihopqa_rows_in_both_shapes():
    original = {
        "_id": "8813f87c0bdd11eba7f7acde48001122",
        "type": "compositional",
        "question": "Who is the mother of the director of film Polish-Russian War (Film)?",
        "context": [
            ["Maheen Khan", ["Maheen Khan is a Pakistani fashion designer.", "She has done many shows."]],
            ["Polish-Russian War (film)", ["Polish-Russian War is a 2009 film.", "It was directed by Xawery Żuławski."]],
            ["Xawery Żuławski", ["Xawery Żuławski is a Polish director.", "His mother is Małgorzata Braunek."]],
        ],
        "supporting_facts": [["Polish-Russian War (film)", 1], ["Xawery Żuławski", 1]],
        "evidences": [["Polish-Russian War", "director", "Xawery Żuławski"]],
        "answer": "Małgorzata Braunek",
    }
    question = from_2wikimultihopqa(original)
    assert question.id == "8813f87c0bdd11eba7f7acde48001122"
    assert question.type == "compositional" and question.level is None
    assert question.supporting_titles == ["Polish-Russian War (film)", "Xawery Żuławski"]
    assert [p.is_supporting for p in question.paragraphs] == [False, True, True]
    # 2Wiki sentences carry no separating space: one is added.
    assert question.paragraphs[0].text == "Maheen Khan is a Pakistani fashion designer. She has done many shows."

    hub = {
        "id": original["_id"],
        "type": original["type"],
        "question": original["question"],
        "answer": original["answer"],
        "context": {"title": [c[0] for c in original["context"]], "sentences": [c[1] for c in original["context"]]},
        "supporting_facts": {"title": [f[0] for f in original["supporting_facts"]], "sent_id": [1, 1]},
    }
    assert from_2wikimultihopqa(hub) == question
    as_strings = {
        **hub,
        "context": json.dumps(original["context"]),
        "supporting_facts": json.dumps(original["supporting_facts"]),
    }
    assert from_2wikimultihopqa(as_strings) == question


MUSIQUE_ROW = {
    "id": "3hop1__222979_40769_64047",
    "paragraphs": [
        {"idx": 0, "title": "Netherlands", "paragraph_text": "The Netherlands ...", "is_supporting": False},
        {"idx": 1, "title": "Aruba", "paragraph_text": "Aruba is a country of the Kingdom.", "is_supporting": True},
        {"idx": 2, "title": "Queen Beatrix", "paragraph_text": "Beatrix was queen.", "is_supporting": True},
        {"idx": 3, "title": "Caribbean", "paragraph_text": "The Caribbean sea.", "is_supporting": True},
    ],
    "question": "When was the queen of the country Aruba belongs to born?",
    "question_decomposition": [
        {"id": 222979, "question": "Aruba >> country", "answer": "Netherlands", "paragraph_support_idx": 1},
        {"id": 40769, "question": "who is the queen of #1", "answer": "Beatrix", "paragraph_support_idx": 2},
        {"id": 64047, "question": "when was #2 born", "answer": "31 January 1938", "paragraph_support_idx": 3},
    ],
    "answer": "31 January 1938",
    "answer_aliases": ["January 31, 1938"],
    "answerable": True,
}


def test_musique_row():
    question = from_musique(MUSIQUE_ROW)
    assert question.id == "3hop1__222979_40769_64047"
    assert question.type == "3hop"
    assert question.answers == ["31 January 1938", "January 31, 1938"]
    assert question.supporting_titles == ["Aruba", "Caribbean", "Queen Beatrix"]
    assert len(question.paragraphs) == 4 and question.paragraphs[1].text == "Aruba is a country of the Kingdom."
    assert [(s.question, s.answer) for s in question.decomposition] == [
        ("Aruba >> country", "Netherlands"),
        ("who is the queen of #1", "Beatrix"),
        ("when was #2 born", "31 January 1938"),
    ]


def test_bamboogle_rows():
    rows = [
        {"Question": "Who was president of the U.S. in the year that Citibank was founded?", "Answer": "james madison"},
        {"Question": "What rocket was the first spacecraft that approached Uranus launched on?", "Answer": "Titan IIIE"},
    ]
    questions = map_rows("bamboogle", rows)
    assert [q.id for q in questions] == ["bamboogle-0", "bamboogle-1"]
    assert questions[1].answer == "Titan IIIE"
    assert questions[0].supporting_titles == [] and questions[0].paragraphs == []
    assert from_bamboogle(rows[1], 7).id == "bamboogle-7"


def test_bad_hub_rows_name_dataset_row_and_field():
    broken = {key: value for key, value in MUSIQUE_ROW.items() if key != "question"}
    with pytest.raises(DataError, match=r"^hub dataset musique row 1: field 'question' missing$"):
        map_rows("musique", [MUSIQUE_ROW, broken])
    with pytest.raises(DataError, match=r"^hub dataset hotpotqa row 0: field 'context' missing$"):
        map_rows("hotpotqa", [{k: v for k, v in HOTPOT_ROW.items() if k != "context"}])
    with pytest.raises(DataError, match=r"^hub dataset bamboogle row 0: field 'question' invalid"):
        map_rows("bamboogle", [{"Question": " ", "Answer": "x"}])


def test_hub_registry_covers_the_four_benchmarks():
    assert set(HUB_DATASETS) == {"hotpotqa", "2wikimultihopqa", "musique", "bamboogle"}
    assert HUB_DATASETS["hotpotqa"].config == "distractor"
    assert HUB_DATASETS["bamboogle"].default_split == "test"


def test_join_sentences():
    assert join_sentences(["A.", " B.", "C."]) == "A. B. C."
    assert join_sentences([]) == ""
    assert join_sentences(["One.", "", "Two."]) == "One. Two."


# --- dspy.Example --------------------------------------------------------------------------------


def test_to_example_inputs_and_labels(data_dir):
    question = read_questions(data_dir / "musique" / "train.jsonl", limit=1)[0]
    example = to_example(question)
    assert set(example.inputs().keys()) == {"question"}
    assert example.inputs().question == question.question
    labels = example.labels()
    assert labels.answer == "G. Stanley Hall"
    assert labels.answers == ["G. Stanley Hall", "Stanley Hall"]
    assert labels.supporting_titles == question.supporting_titles
    assert labels.id == question.id and labels.type == "2hop"
    assert labels.decomposition[1] == {"question": "Who was the first president of #1 ?", "answer": "G. Stanley Hall"}
    json.dumps(dict(example))  # labels are plain data: a saved program with demos serialises
    assert to_example(Question(**GOOD)).decomposition is None
    assert len(to_examples([Question(**GOOD), question])) == 2


# --- stats ---------------------------------------------------------------------------------------


def test_question_and_corpus_stats(tmp_path, data_dir):
    dev = read_questions(data_dir / "hotpotqa" / "dev.jsonl")
    stats = question_stats(dev)
    assert stats["count"] == 300
    assert stats["types"] == {"bridge": 198, "comparison": 52, "unknown": 50}
    assert stats["yes_no_share"] == round(sum(q.answer.lower() in ("yes", "no") for q in dev) / 300, 4)
    assert stats["supporting_titles_per_question"] == {"mean": 2.0, "median": 2.0, "min": 2, "max": 2}
    assert stats["with_decomposition"] == 0 and stats["without_decomposition"] == 300
    assert 1 <= stats["answer_tokens"]["min"] <= stats["answer_tokens"]["median"] <= stats["answer_tokens"]["max"]

    passages = [Passage(id="1", title="A", text="one two three"), Passage(id="2", title="A", text="four")]
    assert corpus_stats(passages) == {
        "kind": "corpus",
        "count": 2,
        "unique_titles": 1,
        "text_words": {"mean": 2.0, "median": 2.0, "min": 1, "max": 3},
        "text_chars_mean": 8.5,
    }
    assert question_stats([])["count"] == 0


def test_detect_kind(tmp_path, data_dir):
    assert detect_kind(data_dir / "hotpotqa" / "corpus.jsonl") == "corpus"
    assert detect_kind(data_dir / "hotpotqa" / "dev.jsonl") == "questions"
    # A question record without its question is still a question record (and then reported as such).
    assert detect_kind(write_lines(tmp_path / "q.jsonl", [{"id": "1", "answer": "x", "text": "t"}])) == "questions"
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        detect_kind(write_lines(tmp_path / "empty.jsonl", ["", " "]))
