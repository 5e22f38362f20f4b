"""Piped to a log, the commands' tables print whole: rich alone cuts them to 80 columns."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from apexdsp.cli.consoles import wide_console


def _run_summary() -> Table:
    """The shape of ``apexdsp run``'s summary: eight columns, a label as long as the real ones."""
    table = Table(title="hotpotqa-opera")
    for column in ("step", "label", "status", "seconds", "em", "f1", "hit", "recall", "decomposition"):
        table.add_column(column)
    table.add_row("evaluate", "bootstrap+grpo", "computed", "4495", "0.087", "0.130", "0.663", "0.753", "0.014")
    return table


def test_a_piped_run_summary_keeps_its_labels_and_headers_whole(capsys):
    Console().print(_run_summary())  # what the commands printed before: 80 columns when piped
    assert "bootstrap+grpo" not in capsys.readouterr().out
    wide_console().print(_run_summary())
    printed = capsys.readouterr().out
    assert "bootstrap+grpo" in printed and "decomposition" in printed
