"""Pydantic records for multi-hop questions and corpus passages (the format of ``shared/data``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Paragraph(BaseModel):
    """One paragraph of a question's own context (distractor setting)."""

    model_config = ConfigDict(extra="ignore")

    title: str
    text: str
    is_supporting: bool = False


class DecompositionStep(BaseModel):
    """A gold sub-question (MuSiQue). ``#1``, ``#2`` ... in the text refer to earlier steps' answers."""

    model_config = ConfigDict(extra="ignore")

    question: str
    answer: str = ""


class Question(BaseModel):
    """A multi-hop question with its gold answer and evidence."""

    model_config = ConfigDict(extra="ignore")

    id: str
    question: str = Field(min_length=1)
    answer: str
    answer_aliases: list[str] = Field(default_factory=list)
    type: str | None = None
    level: str | None = None
    supporting_titles: list[str] = Field(default_factory=list)
    paragraphs: list[Paragraph] = Field(default_factory=list)
    decomposition: list[DecompositionStep] | None = None

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("question is blank")
        return value

    @property
    def answers(self) -> list[str]:
        """The gold answer followed by its aliases, without duplicates."""
        seen: list[str] = []
        for answer in [self.answer, *self.answer_aliases]:
            if answer and answer not in seen:
                seen.append(answer)
        return seen


class Passage(BaseModel):
    """A corpus passage: the unit that indexes store and retrievers return."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    title: str
    text: str


def _field_path(location: tuple) -> str:
    """``('paragraphs', 0, 'text')`` -> ``paragraphs[0].text``."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def describe_validation_error(error: ValidationError) -> str:
    """The first problem of a pydantic error as ``field 'answer' missing`` (plus how many more)."""
    first = error.errors()[0]
    field = _field_path(tuple(first["loc"])) or "record"
    if first["type"] == "missing":
        message = f"field '{field}' missing"
    else:
        detail = first["msg"].removeprefix("Value error, ")
        message = f"field '{field}' invalid ({detail})"
    more = error.error_count() - 1
    return message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
