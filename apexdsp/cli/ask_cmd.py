"""``apexdsp ask``: run one program on one question and show what it did, as a tree or as JSON."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from apexdsp.errors import ApexError
from apexdsp.programs.trajectory import RetrievedPassage, Trajectory

console = Console()


def register(app: typer.Typer) -> None:
    """Add ``ask`` to the root command."""
    app.command("ask")(ask)


def ask(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    program: Annotated[Optional[str], typer.Option(
        help="Program name: vanilla, rag, apex, opera, qagent (default apex).")] = None,
    index: Annotated[Optional[Path], typer.Option(help="Index directory (programs that search).")] = None,
    lm: Annotated[Optional[str], typer.Option(
        help="LM name (smollm2-135m, a local folder, or provider/model; default smollm2-135m).")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Program option KEY=VALUE (e.g. --set max_steps=2); repeatable.")] = None,
    model: Annotated[Optional[str], typer.Option(help=(
        "Ask a compiled program logged as an MLflow model instead: its URI (models:/apexdsp-apex/1, the "
        "model_uri a compile printed, runs:/RUN/program), in MLFLOW_TRACKING_URI or the project's store. "
        "The model brings its program, LMs and index."))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print answer and trajectory as JSON.")] = False,
) -> None:
    """Answer one question and print the trajectory: plan, sub-goals, searches, reflections, answer."""
    if model is not None:
        prediction = ask_model(model, question, program=program, index=index, lm=lm, option=option)
    else:
        prediction = ask_program(question, program=program or "apex", index=index, lm=lm or "smollm2-135m",
                                 options=parse_options(option or []))
    trajectory: Trajectory = prediction.trajectory
    if as_json:
        print(json.dumps({"answer": prediction.answer, "trajectory": trajectory.model_dump()}, ensure_ascii=False))
        return
    console.print(trajectory_tree(trajectory))


def ask_program(question: str, *, program: str, index: Path | None, lm: str, options: dict[str, object]):
    """A registry program's prediction for ``question``, on ``lm``."""
    from apexdsp.programs.registry import PROGRAMS, RETRIEVAL_FREE, build_program
    from apexdsp.runtime import configure_dspy

    if program not in PROGRAMS:
        raise ApexError(f"unknown program {program!r}; known: {', '.join(sorted(PROGRAMS))}")
    if program not in RETRIEVAL_FREE and index is None:
        raise ApexError(f"program {program!r} searches an index: pass --index DIR")
    configure_dspy(lm=lm, cache=False)
    retriever = None
    if index is not None and program not in RETRIEVAL_FREE:
        from apexdsp.indexes import open_retriever

        retriever = open_retriever(index)  # the default searcher: ColBERT and BM25 fused
    qa = build_program(program, retriever=retriever, **options)
    return qa(question=question)


def ask_model(uri: str, question: str, **fixed: object):
    """The prediction of the compiled program logged as MLflow model ``uri``; the options the model fixes
    (``fixed``: program, index, LM, --set) must be left out."""
    given = [f"--{'set' if name == 'option' else name}" for name, value in fixed.items() if value]
    if given:
        raise ApexError(f"--model with {', '.join(given)}: the model brings its program, LMs and index; "
                        "leave them out")
    from apexdsp.optimizers.mlflow_model import load_compiled_model
    from apexdsp.tracking.store import configure_tracking

    configure_tracking()
    with contextlib.redirect_stdout(sys.stderr):  # MLflow's download bars: --json output stays one clean line
        return load_compiled_model(uri).unwrap_python_model().answer(question)


def parse_options(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings to options; values are read as JSON where they parse (numbers, booleans)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ApexError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def trajectory_tree(trajectory: Trajectory) -> Tree:
    """The run as a tree: plan -> sub-goals -> queries -> titles -> answers -> reflections -> answer."""
    root = Tree(f"[bold]{escape(trajectory.program)}[/]: {escape(trajectory.question)}")
    by_search = _group_searches(trajectory.retrieved)
    shown: set[tuple[str, int, int | None]] = set()
    for round_ in range(max(trajectory.rounds, 1)):
        for plan in (p for p in trajectory.plans if p.round == round_):
            _add_plan(root, plan)
        for record in (s for s in trajectory.subgoals if s.round == round_):
            mark = "[green]answered[/]" if record.answered else "[yellow]not answered[/]"
            node = root.add(f"[bold]sub-goal {record.step}[/]: {escape(record.filled or record.question)}")
            if record.unfilled:
                node.add(f"[red]placeholders not filled: {', '.join(f'#{n}' for n in record.unfilled)}[/]")
            for query in record.queries:
                key = (query, round_, record.step)
                shown.add(key)
                _add_search(node, query, by_search.get(key, []))
            node.add(f"{mark}: [bold]{escape(record.answer or '-')}[/]"
                     + (f"  [dim]{escape(record.analysis)}[/]" if record.analysis else ""))
        loose = [key for key in by_search if key[1] == round_ and key not in shown and key[2] is None]
        if loose:
            searches = root.add(f"[bold]searches, round {round_ + 1}[/]")
            for key in loose:
                _add_search(searches, key[0], by_search[key])
        for reflection in (r for r in trajectory.reflections if r.round == round_):
            verdict = "[green]enough[/]" if reflection.enough else "[yellow]not enough[/]"
            node = root.add(f"[bold]reflection[/] after round {round_ + 1}: {verdict}")
            for follow_up in reflection.follow_ups:
                node.add(f"follow-up: {escape(follow_up)}")
            if reflection.note:
                node.add(f"[dim]{escape(reflection.note)}[/]")
    _add_footer(root, trajectory)
    return root


def _group_searches(passages: list[RetrievedPassage]) -> dict[tuple[str, int, int | None], list[RetrievedPassage]]:
    groups: dict[tuple[str, int, int | None], list[RetrievedPassage]] = {}
    for passage in passages:
        groups.setdefault((passage.query, passage.round, passage.step), []).append(passage)
    return groups


def _add_plan(root: Tree, plan) -> None:
    style = "red" if plan.fallback else "bold"
    node = root.add(f"[{style}]plan[/] ({plan.source}, round {plan.round + 1})")
    for step in plan.steps:
        uses = f"  [dim](uses {', '.join(f'#{d}' for d in step.depends_on)})[/]" if step.depends_on else ""
        node.add(f"{step.id}. {escape(step.question)}{uses}")
    for issue in plan.issues:
        node.add(f"[red]{issue.kind}[/]: {escape(issue.detail)}")
    if plan.issues and plan.raw:
        node.add(f"[dim]raw: {escape(repr(plan.raw[:200]))}[/]")


def _add_search(parent: Tree, query: str, passages: list[RetrievedPassage]) -> None:
    node = parent.add(f"query: [cyan]{escape(query)}[/]")
    if not passages:
        node.add("[yellow]no passages[/]")
    for passage in passages:
        node.add(f"{escape(passage.title)} [dim]({passage.score:.2f})[/]")


def _add_footer(root: Tree, trajectory: Trajectory) -> None:
    if trajectory.frozen_answer is not None:
        root.add(f"frozen generator {escape(trajectory.frozen_generator or '')}: "
                 f"[bold]{escape(trajectory.frozen_answer)}[/]")
    root.add(f"[bold green]answer[/]: [bold]{escape(trajectory.answer or '(empty)')}[/]")
    for failure in trajectory.parse_failures:
        root.add(f"[red]parse failure in {escape(failure.module)}[/]: missing {', '.join(failure.missing_fields)}"
                 f" [dim]{escape(repr(failure.completion[:120]))}[/]")
    for note in trajectory.notes:
        root.add(f"[yellow]note[/]: {escape(note)}")
    for error in trajectory.errors:
        root.add(f"[red]error[/]: {escape(error)}")
    usage = trajectory.usage
    root.add(f"[dim]{usage.calls} LM calls, {usage.prompt_tokens} prompt + {usage.completion_tokens} "
             f"completion tokens[/]")
