"""``apexdsp data``: look at question and corpus files before spending compute on them."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from apexdsp.data.stats import file_stats

app = typer.Typer(help="Inspect question and corpus JSONL files.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Inspect question and corpus JSONL files."""
    # A callback keeps ``data`` a command group even while it has a single command.


def _format_summary(summary: dict[str, float]) -> str:
    return " · ".join(f"{key} {summary[key]:g}" for key in ("mean", "median", "min", "max"))


def _format_counter(counter: dict[str, int], total: int) -> str:
    if not counter:
        return "-"
    return ", ".join(f"{key} {value} ({value / total:.0%})" for key, value in counter.items())


def _rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """The stats as (label, value) rows for the table."""
    count = stats["count"]
    if stats["kind"] == "corpus":
        return [
            ("passages", f"{count:,}"),
            ("unique titles", f"{stats['unique_titles']:,}"),
            ("text length (words)", _format_summary(stats["text_words"])),
            ("text length (chars, mean)", f"{stats['text_chars_mean']:g}"),
        ]
    steps = {f"{hops} steps": number for hops, number in stats["decomposition_steps"].items()}
    return [
        ("questions", f"{count:,}"),
        ("types", _format_counter(stats["types"], count)),
        ("levels", _format_counter(stats["levels"], count)),
        ("answer length (normalised tokens)", _format_summary(stats["answer_tokens"])),
        ("yes/no answers", f"{stats['yes_no_share']:.1%}"),
        ("with answer aliases", f"{stats['with_aliases']:,}"),
        ("supporting titles per question", _format_summary(stats["supporting_titles_per_question"])),
        ("paragraphs per question", _format_summary(stats["paragraphs_per_question"])),
        ("with / without decomposition", f"{stats['with_decomposition']:,} / {stats['without_decomposition']:,}"),
        ("decomposition steps", _format_counter(steps, max(stats["with_decomposition"], 1))),
    ]


@app.command()
def stats(
    path: Annotated[
        str, typer.Argument(metavar="PATH", help="A question or corpus JSONL file (the kind is detected).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as one JSON object.")] = False,
) -> None:
    """Counts, question types, answer lengths and evidence per question (or passage stats for a corpus)."""
    result = file_stats(path)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    table = Table(title=f"{result['file']} ({result['kind']})", title_justify="left")
    table.add_column("stat", style="bold")
    table.add_column("value", overflow="fold")
    for label, value in _rows(result):
        table.add_row(label, value)
    table.add_row("sha256", result["sha256"], style="dim")
    Console().print(table)
