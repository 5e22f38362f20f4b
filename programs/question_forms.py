"""What form of answer a question asks for: yes/no, one of two named options, or an open factoid.

Multi-hop benchmarks ask two closed forms besides open factoids, and a small model answers both badly
when asked openly: it writes a sentence to a yes/no question, and to "Who was born first, Bobcat
Goldthwait or Maurice Elvey?" it copies a passage line or both names. Both forms name their own answer
space, so the answer step can offer it as a typed choice instead (:mod:`.answer`).

:func:`choice_options` reads the two options of an "X or Y" comparison. On the 300 HotpotQA dev questions
it finds two in each of the 42 questions that contain "or", and the gold answer (or an alias) is one of them
in 34; the other 8 golds are longer forms of a name ("Helen Elizabeth Hunt" for "Helen Hunt") or a
sentence. It does not fire on "or" inside a clause ("a headquarter or editor"), where the words around
"or" are not names.
"""

from __future__ import annotations

import re

_AUXILIARIES = frozenset("is are was were do does did can could has have had will would should shall may might "
                         "must".split())
# Lower-case words that may sit inside a name ("Battle of Pusan Perimeter", "Hot Lead and Cold Feet").
_CONNECTORS = frozenset("of and the de la le du von van der del for on in & y da".split())
_ARTICLES = frozenset({"the", "a", "an"})
# What sets an option off from the rest of the question: "Which is older, X or Y?", "...: X or Y?".
_SEPARATOR = re.compile(r",|:|--|—|–\s")


def is_yes_no_question(question: str) -> bool:
    """Whether ``question`` asks for yes or no: it opens with an auxiliary verb ("Were Scott Derrickson and
    Ed Wood of the same nationality?") and offers no "or" choice ("Is X or Y older?" names its answer)."""
    words = re.findall(r"[a-z]+", question.lower())
    return bool(words) and words[0] in _AUXILIARIES and "or" not in words


def choice_options(question: str) -> tuple[str, str] | None:
    """The two options of an "X or Y" question, or ``None`` when it does not name two.

    ``"Which magazine was started first, Arthur's Magazine or First for Women?"`` gives
    ``("Arthur's Magazine", "First for Women")``. The left option is what follows the last separator
    before "or" (a comma, colon or dash), else the run of capitalised words that ends at "or"; the right
    option is the run of capitalised words (with inner connectors, a leading article and commas before
    another capitalised word) that starts after it.
    """
    text = " ".join(question.replace("?", " ? ").split())
    match = re.search(r"\s+or\s+", text)
    if not match:
        return None
    first = _left_option(text[:match.start()])
    second = _right_option(text[match.end():].split(" ?")[0])
    return (first, second) if first and second else None


def _is_name_word(word: str) -> bool:
    return bool(word) and (word[0].isupper() or word[0].isdigit())


def _left_option(left: str) -> str:
    parts = _SEPARATOR.split(left)
    if len(parts) > 1 and parts[-1].strip():
        return parts[-1].strip()
    run: list[str] = []
    for word in reversed(left.split()[1:]):  # never the question word ("Which", "Is")
        if _is_name_word(word) or (run and word.lower() in _CONNECTORS):
            run.insert(0, word)
        else:
            break
    while run and run[0].lower() in _CONNECTORS:
        run.pop(0)
    return " ".join(run)


def _right_option(right: str) -> str:
    words = right.split()
    article = [words.pop(0)] if words and words[0].lower() in _ARTICLES else []
    run: list[str] = []
    pending: list[str] = []
    for i, word in enumerate(words):
        bare = word.rstrip(",")
        if _is_name_word(bare):
            run += pending + [word]
            pending = []
            if word.endswith(",") and not (i + 1 < len(words) and _is_name_word(words[i + 1])):
                break  # "A Silent Film or The Frames, has more members": the comma ends the option
        elif run and bare.lower() in _CONNECTORS:
            pending.append(word)
        else:
            break
    name = " ".join(run).rstrip(",")
    return " ".join(article + [name]) if name else ""


def format_options(options: tuple[str, str]) -> str:
    """The options as the choice predictor reads them: ``A) first`` and ``B) second`` on two lines."""
    return f"A) {options[0]}\nB) {options[1]}"


def parse_options(text: object) -> tuple[str, str] | None:
    """The options back from :func:`format_options`'s text (``None`` for anything else)."""
    lines = str(text or "").splitlines()
    if len(lines) != 2 or not (lines[0].startswith("A) ") and lines[1].startswith("B) ")):
        return None
    return lines[0][3:], lines[1][3:]


def chosen_option(letter: str | None, options: tuple[str, str]) -> str:
    """The option a reply names: ``B`` (or the second option's text) picks the second, anything else the first."""
    reply = (letter or "").strip().rstrip(").:").strip().lower()
    return options[1] if reply in {"b", options[1].lower()} else options[0]
