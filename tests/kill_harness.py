"""Fault injection for the kill-and-rerun tests: start a real ``apexdsp`` command, SIGKILL its process group
at a kill point, run it again, and record what the rerun left behind.

A kill point is a delay after the start (:func:`delay_points`, drawn with ``random.Random(seed)`` inside a
command's measured duration) or a named point seen from outside (:func:`path_point`: a file or folder
appears, found by polling the filesystem every ``POLL_S`` seconds). Every command starts in a session of
its own, so ``os.killpg`` reaches its children too, and writes its output to files, never to pipes that a
killed reader would leave full. :class:`KillTable` gathers one :class:`Outcome` per kill and prints the
table command x kill points x reruns finished x artifacts equal x files lost x MLflow runs left RUNNING.
With ``APEXDSP_KILL_REPORT=path`` set, the table is also written there as JSON (:data:`REPORT_ENV`).
It also reads back what the commands leave (a compiled program, an experiment's step folders, ``run
--check``).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APEXDSP = str(Path(sys.executable).parent / "apexdsp")
POLL_S = 0.03
COMMAND_TIMEOUT_S = 600
REPORT_ENV = "APEXDSP_KILL_REPORT"  # a path: where the session's table goes as JSON, besides pytest's temp folder
# Names that writers in apexdsp, TRL and transformers give a file or folder before it is complete.
TEMP_MARKERS = (".tmp", ".old", "tmp-checkpoint-")
# The figures of an evaluation that do not depend on timing.
SCORES = ("n", "em", "f1", "hit", "recall", "tokens", "failures", "parse_failures")


@dataclass
class Finished:
    """A command that ran to its end: exit code, the two output files' text, wall seconds."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def last_json(self) -> dict:
        """The last line of stdout parsed as JSON (the ``--json`` summary)."""
        return json.loads(self.stdout.strip().splitlines()[-1])


@dataclass
class KillPoint:
    """When to kill: ``delay`` seconds after the start, or as soon as ``reached()`` is true."""

    label: str
    delay: float | None = None
    reached: Callable[[], bool] | None = None


@dataclass
class Killed:
    """What a kill attempt did: ``killed`` false means the command exited (``returncode``) before the point;
    ``temps``: the unfinished writes it left (what the rerun must clean up); ``pid``: the command's."""

    point: str
    killed: bool
    at_s: float
    returncode: int | None = None
    temps: list[str] = field(default_factory=list)
    pid: int = 0


@dataclass
class Outcome:
    """One kill and its rerun, as the table counts it; ``notes`` say what differed or was left behind."""

    command: str
    point: str
    killed: bool
    rerun_finished: bool
    equal: bool
    files_lost: int
    running_left: int
    temps_left: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rerun_seconds: float = 0.0


def error_line(text: str) -> str:
    """The exception line of a traceback (``module.Error: message``), else the last line."""
    lines = text.strip().splitlines() or [""]
    return next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), lines[-1])


def command_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a command: one torch thread (deterministic reductions), wide logs, ``extra``."""
    env = dict(os.environ if base is None else base)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "COLUMNS": "200",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _start(argv: list[str], env: dict[str, str], logs: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=stdout, stderr=stderr, start_new_session=True)
    return process, out, err


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the command and everything it started (its process group), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_to_end(argv: list[str], env: dict[str, str], logs: Path, name: str,
               timeout: float = COMMAND_TIMEOUT_S) -> Finished:
    """Run ``argv`` to its end (its process group is killed if it outlives ``timeout``)."""
    started = time.monotonic()
    process, out, err = _start(argv, env, logs, name)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        code = -signal.SIGKILL
    return Finished(code, out.read_text(), err.read_text(), time.monotonic() - started)


def run_and_kill(argv: list[str], env: dict[str, str], point: KillPoint, logs: Path, name: str,
                 timeout: float = COMMAND_TIMEOUT_S) -> Killed:
    """Start ``argv`` and SIGKILL its process group at ``point``, unless it exits first (``logs``: the folder
    the command writes in, searched for what the kill left)."""
    started = time.monotonic()
    process, _, _ = _start(argv, env, logs, name)
    while True:
        elapsed = time.monotonic() - started
        code = process.poll()
        if code is not None:
            return Killed(point.label, False, elapsed, code, pid=process.pid)
        due = point.delay is not None and elapsed >= point.delay
        if due or (point.reached is not None and point.reached()) or elapsed > timeout:
            kill_group(process)
            return Killed(point.label, True, elapsed, temps=leftover_temps(logs), pid=process.pid)
        time.sleep(POLL_S)


def delay_points(seed: int, duration: float, count: int = 1, low: float = 0.15,
                 high: float = 0.9) -> list[KillPoint]:
    """``count`` delays drawn by ``random.Random(seed)`` between ``low`` and ``high`` of ``duration``."""
    draw = random.Random(seed)
    delays = sorted(round(draw.uniform(low * duration, high * duration), 2) for _ in range(count))
    return [KillPoint(f"seed {seed}: {delay:.1f}s", delay=delay) for delay in delays]


def path_point(label: str, root: Path, pattern: str, check: Callable[[Path], bool] | None = None) -> KillPoint:
    """Kill as soon as a path matching ``pattern`` under ``root`` exists (and passes ``check``)."""

    def reached() -> bool:
        return any(check is None or check(path) for path in root.glob(pattern))

    return KillPoint(label, reached=reached)


def aged_point(label: str, root: Path, pattern: str, seconds: float) -> KillPoint:
    """Kill ``seconds`` after a path matching ``pattern`` under ``root`` is first seen (a write that takes a
    while, caught part-way)."""
    first_seen: list[float] = []

    def reached() -> bool:
        if not first_seen and any(root.glob(pattern)):
            first_seen.append(time.monotonic())
        return bool(first_seen) and time.monotonic() - first_seen[0] >= seconds

    return KillPoint(label, reached=reached)


def jsonl_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file that parse (a line cut off by a kill does not)."""
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def broken_json(root: Path) -> list[str]:
    """Every ``*.json`` under ``root`` (temporary names excluded) that does not parse: a half-written file."""
    broken = []
    for path in sorted(root.rglob("*.json")):
        if is_temporary(path.relative_to(root)) or not path.is_file():
            continue
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            broken.append(str(path.relative_to(root)))
    return broken


def is_temporary(relative: Path) -> bool:
    """Whether some part of ``relative`` is named as an unfinished write: ``.x.json.abc.tmp``, ``.out.tmp-12``,
    ``tmp-checkpoint-3``, a hidden staging folder in ``weights/`` (``weights/.reader.generate-k2x``), or a
    folder built or set aside beside its target by a process (``index.tmp-123``, ``index.old-123``)."""
    parts = relative.parts
    return any((part.startswith(".") and any(marker in part for marker in TEMP_MARKERS))
               or part.startswith("tmp-checkpoint-") or (part.startswith(".") and i and parts[i - 1] == "weights")
               or re.search(r"\.(tmp|old)-\d+$", part) is not None
               for i, part in enumerate(parts))


def leftover_temps(root: Path) -> list[str]:
    """Temporary files and folders left under ``root`` (outermost only)."""
    found: list[str] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if is_temporary(relative) and not any(relative.is_relative_to(f) for f in found):
            found.append(str(relative))
    return found


def running_runs(tracking_uri: str) -> list[str]:
    """``experiment/run name (run id)`` of every run still RUNNING in the store at ``tracking_uri``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], filter_string="attributes.status = 'RUNNING'",
                              max_results=1000) if experiments else []
    names = {e.experiment_id: e.name for e in experiments}
    return [f"{names[r.info.experiment_id]}/{r.info.run_name} ({r.info.run_id})" for r in runs]


def step_runs(tracking_uri: str) -> dict[str, list[str]]:
    """``{step key: [status of each run logged for it]}`` of the ``apexdsp run`` step runs in a store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: dict[str, list[str]] = {}
    for run in client.search_runs(experiments, "tags.`apexdsp.kind` = 'step'", max_results=1000) if experiments else []:
        found.setdefault(run.data.tags["apexdsp.step_key"], []).append(run.info.status)
    return found


# -- what the apexdsp commands leave: read back for comparison -------------------------------------------

def compiled_program(out: Path) -> dict:
    """What a compile must reproduce: the saved state, the manifest's deterministic fields, the weights."""
    from safetensors.torch import load_file

    from apexdsp.optimizers.compiled import load_compiled, read_manifest

    manifest = read_manifest(out)
    load_compiled(out)  # the program loads, its predictor bound to the trained weights
    weights = out / manifest.modules["generate_answer"].weights
    assert (weights / "apexdsp-trained.json").is_file() and (weights / "config.json").is_file()
    stages = [{k: s[k] for k in ("kind", "module", "steps")} for s in manifest.optimizer["stages"]]
    return {"state": json.loads((out / "program.json").read_text()), "program": manifest.program,
            "modules": {name: b.model_dump() for name, b in manifest.modules.items()}, "stages": stages,
            "weights": load_file(weights / "model.safetensors")}


def same_program(a: dict, b: dict) -> bool:
    """Whether two :func:`compiled_program` readings agree, the weights tensor by tensor and bit for bit."""
    import torch

    plain = [key for key in a if key != "weights"]
    return ([a[k] for k in plain] == [b[k] for k in plain] and a["weights"].keys() == b["weights"].keys()
            and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]))


def parses(path: Path) -> bool:
    """Whether ``path`` holds a whole JSON document (a named kill point waits for one)."""
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def resumed_without_training(rerun_log: Path) -> bool:
    """TRL's summary of a run resumed at its last step: no step ran (a train_runtime of milliseconds)."""
    text = rerun_log.read_text()
    at = text.rfind("'train_runtime': ")
    return at >= 0 and float(text[at + len("'train_runtime': "):].split(",")[0]) < 1.0


def step_results(cache: Path) -> dict:
    """Per step folder: its result's kind and label, an evaluation's scores and answers, a stage's weights."""
    from safetensors.torch import load_file

    found = {}
    for folder in sorted(p for p in cache.iterdir() if p.is_dir() and p.name not in ("locks", "ledger")):
        result = json.loads((folder / "result.json").read_text())
        entry = {"kind": result["kind"], "label": result["label"]}
        if result["kind"] == "evaluate":
            report = json.loads((folder / "report.json").read_text())
            entry["scores"] = {k: result["metrics"].get(k) for k in SCORES}
            entry["answers"] = [(r["id"], r["prediction"], r["em"], r["f1"]) for r in report["results"]]
        for weights in sorted((folder / "program" / "weights").glob("*/model.safetensors")):
            entry[str(weights.relative_to(folder))] = {k: v.tolist() for k, v in load_file(weights).items()}
        found[folder.name] = entry
    return found


def check_states(spec: Path, cache: Path, folder: Path) -> dict[str, str]:
    """``apexdsp run --check``: the state it prints per step key."""
    done = run_to_end([APEXDSP, "run", str(spec), "--check", "--cache-dir", str(cache)], command_env(), folder,
                      "check")
    assert done.returncode == 0, done.stderr[-2000:]
    states = {}
    for line in done.stdout.splitlines():
        words = line.split()
        key = next((w for w in words if w.startswith(("evaluate-", "compile-", "index-", "encoder-"))), None)
        if key is not None:
            states[key] = line.split(key, 1)[1].strip()
    return states


class KillTable:
    """The outcomes of one test session, counted per command."""

    COLUMNS = ("command", "kill points tried", "reruns finished", "equal to uninterrupted", "files lost",
               "MLflow RUNNING left", "temps left")

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def add(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        return outcome

    def rows(self) -> list[dict]:
        rows: dict[str, dict] = {}
        for o in self.outcomes:
            row = rows.setdefault(o.command, dict.fromkeys(self.COLUMNS, 0) | {"command": o.command})
            row["kill points tried"] += 1
            row["reruns finished"] += o.rerun_finished
            row["equal to uninterrupted"] += o.equal
            row["files lost"] += o.files_lost
            row["MLflow RUNNING left"] += o.running_left
            row["temps left"] += len(o.temps_left)
        return list(rows.values())

    def render(self) -> str:
        rows = self.rows()
        widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in self.COLUMNS] if rows else []
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.COLUMNS, widths))]
        lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(self.COLUMNS, widths)) for r in rows]
        details = [f"  {o.command} @ {o.point}: " + "; ".join(o.notes + [f"temp left: {t}" for t in o.temps_left])
                   for o in self.outcomes if o.notes or o.temps_left]
        return "\n".join(lines + (["notes:"] + details if details else []))

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": self.rows(), "outcomes": [asdict(o) for o in self.outcomes]}, indent=2))
        return path

    def write_all(self, temp_folder: Path) -> list[Path]:
        """``kill_table.json`` in ``temp_folder``, and the file :data:`REPORT_ENV` names, if set."""
        paths = [temp_folder / "kill_table.json"]
        if os.environ.get(REPORT_ENV):
            paths.append(Path(os.environ[REPORT_ENV]))
        return [self.write(path) for path in paths]


TABLE = KillTable()
