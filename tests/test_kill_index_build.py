"""``apexdsp index build`` killed and run again: the rerun builds the index an uninterrupted build gives, bit
for bit, and a complete index already at ``--out`` survives a kill of the build that replaces it.

The build runs in a staging folder beside ``--out`` (``index.tmp-<pid>``) and is swapped in when complete
(``indexes/atomic.py``); a kill leaves that folder behind and the next build removes it. The corpus is the
tiny experiment's 40 paragraphs; the encoder is trained here in a few seconds (projection only). The build
is not tracked in MLflow, so no run can be left RUNNING. The sweep over more points is marked
``kill_long``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from experiment_fixtures import write_tiny_experiment
from kill_checks import Baseline, check, env_for, record
from kill_harness import (APEXDSP, KillPoint, Outcome, broken_json, delay_points, leftover_temps, path_point,
                          run_and_kill, run_to_end)

pytestmark = pytest.mark.slow
COMMAND = "index build"
# Fields of colbert's metadata.json and plan.json that name the staging folder or the time of the build.
VOLATILE = {"index_path", "root", "name"}
# Manifest fields that do not depend on the time or the machine's load.
MANIFEST = ("passages", "corpus_sha256", "encoder_fingerprint", "nbits", "dim", "partitions", "embeddings",
            "doc_maxlen", "query_maxlen")


@pytest.fixture(scope="module")
def build_inputs(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """The corpus (the paragraphs of four HotpotQA dev questions) and a ColBERT encoder trained for it."""
    from apexdsp.indexes.encoder_job import train_encoder
    from apexdsp.indexes.encoder_training import EncoderTrainingConfig

    folder = tmp_path_factory.mktemp("index-inputs")
    write_tiny_experiment(folder, data_dir)
    config = EncoderTrainingConfig(steps=2, batch_size=4, train_layers=0, distractors_per_question=2,
                                   mined_per_question=1, heldout_questions=2, pca_sample=32, limit_per_file=8)
    encoder = train_encoder([data_dir / "hotpotqa" / "train.jsonl"], folder / "encoder", config, track=False,
                            progress=False)
    return folder / "corpus.jsonl", encoder.path


def build_argv(inputs: tuple[Path, Path], out: Path) -> list[str]:
    corpus, encoder = inputs
    return [APEXDSP, "index", "build", "--corpus", str(corpus), "--encoder", str(encoder), "--out", str(out),
            "--threads", "1", "--json"]


def _without(value, keys: set[str]):
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    return [_without(v, keys) for v in value] if isinstance(value, list) else value


def built_index(out: Path) -> dict:
    """What a build must reproduce: the manifest's deterministic fields, the passage table, every colbert
    file (its bytes; the two JSON files that name the staging folder, without those names)."""
    manifest = json.loads((out / "apexdsp-index.json").read_text())
    files = {}
    for path in sorted((out / "colbert").iterdir()):
        if path.name in ("metadata.json", "plan.json"):
            files[path.name] = _without(json.loads(path.read_text()), VOLATILE)
        else:
            files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"manifest": {k: manifest[k] for k in MANIFEST}, "passages": (out / "passages.jsonl").read_text(),
            "colbert": files}


def readable_index(out: Path) -> dict | None:
    try:
        return built_index(out)
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def index_baseline(tmp_path_factory, build_inputs) -> tuple[Path, Baseline]:
    """Two uninterrupted builds, which must agree; the second one's seconds are the range of random kills
    (the first may compile colbert's extensions, minutes that no later build spends)."""
    folder = tmp_path_factory.mktemp("index-baseline")
    builds = [run_to_end(build_argv(build_inputs, folder / name), env_for(folder), folder, name)
              for name in ("first", "index")]
    assert [done.returncode for done in builds] == [0, 0], builds[-1].stderr[-2000:]
    assert built_index(folder / "first") == built_index(folder / "index"), "two builds of one corpus differ"
    return folder / "index", Baseline(built_index(folder / "index"), builds[-1].seconds)


def staged(folder: Path, label: str, pattern: str) -> KillPoint:
    """Kill once ``pattern`` exists in the build's staging folder (``index.tmp-<pid>``)."""
    return path_point(label, folder, f"index.tmp-*/{pattern}")


# The points of a build, in order, each lasting long enough to be seen: the passage table written, colbert's
# plan written (encoding next), k-means trained (the codec saved), the residuals compressed.
POINTS = {"passage table written": "passages.jsonl", "plan written": "colbert/plan.json",
          "centroids trained": "colbert/centroids.pt", "residuals compressed": "colbert/0.residuals.pt"}
# The last milliseconds of a build: the inverted list, colbert's metadata, the manifest, the swap into place.
LAST = {"inverted list written": "index.tmp-*/colbert/ivf.pid.pt",
        "colbert metadata written": "index.tmp-*/colbert/metadata.json",
        "manifest written": "index.tmp-*/apexdsp-index.json", "swapping in": "index.old-*"}


def kill_build(folder: Path, point: KillPoint, inputs: tuple[Path, Path], baseline: tuple[Path, Baseline],
               earlier: bool = False) -> Outcome:
    """Kill a build at ``point`` (over a complete index at ``--out`` when ``earlier``), then rerun it."""
    built, expected = baseline
    out = folder / "index"
    if earlier:  # an index built before, from the same inputs: the kill must leave it whole
        shutil.copytree(built, out)
    argv, env = build_argv(inputs, out), env_for(folder)
    killed = run_and_kill(argv, env, point, folder, "killed")
    notes, lost = [], len(broken_json(folder))
    after_kill = readable_index(out)
    if earlier and after_kill != expected.value:
        lost, notes = lost + 1, notes + ["the earlier index at --out is damaged or gone after the kill"]
    if out.exists() and after_kill is None:
        lost, notes = lost + 1, notes + ["an incomplete index at --out after the kill"]
    rerun = run_to_end(argv, env, folder, "rerun")
    got = readable_index(out) if rerun.returncode == 0 else None
    if rerun.returncode == 0 and got is None:
        lost, notes = lost + 1, notes + ["the rerun's index is unreadable"]
    staging = [Path(t).name for t in killed.temps]
    state = (("over an earlier index; " if earlier else "") + (f"staging {', '.join(staging)}" if staging
                                                                else "no staging folder"))
    return record(COMMAND, point.label, killed, rerun, got == expected.value, lost, [], folder, notes, state)


def test_a_build_killed_after_training_its_centroids_over_an_earlier_index_keeps_it_and_rebuilds(
        tmp_path, build_inputs, index_baseline, kill_table):
    point = staged(tmp_path, "centroids trained", POINTS["centroids trained"])
    outcome = kill_build(tmp_path, point, build_inputs, index_baseline, earlier=True)
    check(outcome)
    assert not leftover_temps(tmp_path) and sorted(p.name for p in tmp_path.glob("index*")) == ["index"]


@pytest.mark.kill_long
@pytest.mark.parametrize("where", list(POINTS))
def test_sweep_index_build_at_named_points(where, tmp_path, build_inputs, index_baseline, kill_table):
    check(kill_build(tmp_path, staged(tmp_path, where, POINTS[where]), build_inputs, index_baseline))


@pytest.mark.kill_long
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over an earlier index"])
def test_sweep_index_build_at_seeded_random_points(seed, earlier, tmp_path, build_inputs, index_baseline,
                                                   kill_table):
    (point,) = delay_points(seed, index_baseline[1].seconds)
    check(kill_build(tmp_path, point, build_inputs, index_baseline, earlier=earlier), drawn=True)


@pytest.mark.kill_long
@pytest.mark.parametrize("where", list(LAST))
def test_sweep_index_build_in_its_last_milliseconds(where, tmp_path, build_inputs, index_baseline, kill_table):
    """Windows of milliseconds over an earlier index, so the build may finish first (skipped): a kill between
    moving the earlier index aside (``index.old-<pid>``) and the new one in is undone by the rerun, which
    puts the earlier one back before it builds."""
    point = path_point(where, tmp_path, LAST[where])
    check(kill_build(tmp_path, point, build_inputs, index_baseline, earlier=True), drawn=True)
