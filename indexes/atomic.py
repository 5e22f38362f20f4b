"""Directories that appear only when complete: build in a temporary sibling, then swap into place.

An interrupted build leaves at most a ``NAME.tmp-<pid>`` folder beside the target and never touches an
earlier complete directory at the target path: it is moved aside only once the new one is finished,
and removed only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from apexdsp.locks import process_alive


def remove_abandoned(target: Path, hidden: bool = False) -> list[Path]:
    """Delete staging folders of ``target`` left by builds whose process died (killed, power loss); an
    earlier ``target`` a build had moved aside goes back in place. ``hidden``: the folders are named
    ``.NAME.tmp-<pid>`` and ``.NAME.old-<pid>`` (as a compiled program's save names them)."""
    removed = []
    for kind in ("tmp", "old"):
        for leftover in target.parent.glob(f"{'.' if hidden else ''}{target.name}.{kind}-*"):
            suffix = leftover.name.rsplit("-", 1)[-1]
            if not (suffix.isdigit() and leftover.is_dir()) or process_alive(int(suffix)):
                continue
            if kind == "old" and not target.exists():
                os.replace(leftover, target)  # died between moving the old one aside and the new one in
                continue
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


def staging_dir(target: Path) -> Path:
    """A fresh temporary sibling of ``target`` owned by this process (abandoned ones are cleared first)."""
    remove_abandoned(target)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def replace_dir(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` folder to ``target``, replacing what was there."""
    aside = None
    if target.exists():
        aside = target.with_name(f"{target.name}.old-{os.getpid()}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        if aside is not None and not target.exists():
            os.replace(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def building(target: str | os.PathLike[str]) -> Iterator[Path]:
    """``with building(out) as tmp:`` write into ``tmp``; on success it becomes ``out``, on failure it is removed."""
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, target)
