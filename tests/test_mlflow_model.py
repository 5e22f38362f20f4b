"""Compiled programs as MLflow models: logged, registered, loaded in a fresh process, served over HTTP.

Real everything: a compiled ``vanilla`` program on the tiny random Llama (float32, greedy), each test's own
sqlite MLflow store, ``mlflow.pyfunc.load_model`` in a new interpreter and ``mlflow models serve`` on a
loopback port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import dspy
import mlflow
import pytest

from apexdsp.errors import ApexError
from apexdsp.optimizers.compiled import MANIFEST_FILE, load_compiled, save_compiled
from apexdsp.optimizers.mlflow_model import log_compiled_model
from apexdsp.programs.registry import build_program
from apexdsp.tracking.store import ensure_experiment

BIN = str(Path(sys.executable).parent)  # mlflow runs uvicorn by name: the environment's bin must be on PATH
MLFLOW = str(Path(BIN) / "mlflow")
QUESTIONS = ["Who directed Jaws?", "When was Steven Spielberg born?", "Is Paris the capital of France?"]


@pytest.fixture
def compiled(tmp_path, tiny_model_dir) -> Path:
    """A compiled closed-book program with one demo, on the tiny model."""
    program = build_program("vanilla", max_tokens=6)
    program.generate_answer.demos = [dspy.Example(augmented=True, question="Who wrote Hamlet?",
                                                  answer="William Shakespeare")]
    out = tmp_path / "compiled"
    save_compiled(program, out, lm=str(tiny_model_dir))
    return out


@pytest.fixture
def experiment(isolated_mlflow) -> str:
    """An experiment whose artifacts sit beside the test's sqlite store."""
    return ensure_experiment("compiled-models")


def answers_here(compiled: Path, tiny_model_dir: Path, questions: list[str]) -> list[str]:
    """What the compiled program answers in this process (float32, one question at a time)."""
    from apexdsp.lm.adapter import TolerantChatAdapter
    from apexdsp.lm.engine import EngineConfig
    from apexdsp.lm.registry import get_lm

    program = load_compiled(compiled).program
    lm = get_lm(str(tiny_model_dir), engine_config=EngineConfig(dtype="float32"), cache=False)
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        return [program(question=q).answer for q in questions]


def test_a_logged_model_answers_in_a_fresh_process_as_the_compiled_program_does(compiled, experiment,
                                                                                tiny_model_dir):
    with mlflow.start_run(experiment_id=experiment) as run:
        uri = log_compiled_model(compiled, dtype="float32")
    logged = mlflow.get_logged_model(uri.removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id
    script = textwrap.dedent(f"""
        import json
        import mlflow.pyfunc
        import pandas as pd
        model = mlflow.pyfunc.load_model({uri!r})
        frame = model.predict(pd.DataFrame({{"question": {QUESTIONS!r}}}))
        records = model.predict([{{"question": q}} for q in {QUESTIONS[:1]!r}])
        print(json.dumps({{"columns": list(frame.columns), "answers": frame["answer"].tolist(),
                           "records": records["answer"].tolist()}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]})
    assert result.returncode == 0, result.stderr[-3000:]
    there = json.loads(result.stdout.strip().splitlines()[-1])
    here = answers_here(compiled, tiny_model_dir, QUESTIONS)
    assert there["columns"] == ["answer"]
    assert len(there["answers"]) == len(QUESTIONS) and all(isinstance(a, str) for a in there["answers"])
    assert there["answers"] == here
    assert there["records"] == here[:1]


def test_registering_gives_one_model_per_program_and_a_version_per_log(compiled, experiment):
    with mlflow.start_run(experiment_id=experiment):
        first = log_compiled_model(compiled, registered_model_name="vanilla-qa")
    with mlflow.start_run(experiment_id=experiment):
        second = log_compiled_model(compiled, registered_model_name="vanilla-qa")
    assert first != second
    client = mlflow.MlflowClient()
    assert client.get_registered_model("vanilla-qa").name == "vanilla-qa"
    versions = sorted(client.search_model_versions("name='vanilla-qa'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert [v.source for v in versions] == [first, second]
    model = mlflow.pyfunc.load_model("models:/vanilla-qa/2")
    assert model.metadata.get_input_schema().input_names() == ["question"]
    assert model.metadata.metadata["apexdsp_program"] == "vanilla"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_serves_a_logged_model_over_http(compiled, experiment, tiny_model_dir, tmp_path):
    with mlflow.start_run(experiment_id=experiment):
        uri = log_compiled_model(compiled, dtype="float32")
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([MLFLOW, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if opener.open(f"{base}/ping", timeout=5).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"not up in 120 s: {(tmp_path / 'serve.log').read_text()[-3000:]}"
            time.sleep(1)
        body = json.dumps({"dataframe_records": [{"question": QUESTIONS[0]}]}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with opener.open(request, timeout=120) as response:
            reply = json.loads(response.read())
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=20)
        log.close()
    assert reply == {"predictions": [{"answer": answers_here(compiled, tiny_model_dir, QUESTIONS[:1])[0]}]}


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.rename(d.parent / "gone"), "not found"),
    (lambda d: (d / MANIFEST_FILE).unlink(), "not a compiled program"),
    (lambda d: (d / MANIFEST_FILE).write_text((d / MANIFEST_FILE).read_text().replace(
        '"weights": null', '"weights": "weights/generate_answer"')), "missing weights/generate_answer"),
])
def test_bad_directories_are_refused_in_one_line_before_anything_is_logged(compiled, experiment, damage, message):
    damage(compiled)
    with mlflow.start_run(experiment_id=experiment), pytest.raises(ApexError, match=message) as error:
        log_compiled_model(compiled)
    assert "\n" not in str(error.value)
    assert not mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")


def test_a_searching_program_needs_its_index_and_a_known_dtype(tmp_path, compiled, experiment):
    from apexdsp.data.records import Passage
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus
    from apexdsp.optimizers.compiled import IndexRef

    retriever = BM25Retriever(Corpus(passages=[Passage(id="p0", title="Jaws", text="Jaws is a 1975 film.")]))
    apex = build_program("apex", retriever=retriever, max_steps=2)
    save_compiled(apex, tmp_path / "no-index", lm="smollm2-135m")
    save_compiled(apex, tmp_path / "gone-index", lm="smollm2-135m", index=IndexRef(path=str(tmp_path / "nowhere")))
    cases = [(tmp_path / "no-index", {}, "manifest names none"),
             (tmp_path / "gone-index", {"include_index": True}, "is not there to include"),
             (compiled, {"dtype": "float16"}, "dtype 'float16': expected one of auto, bfloat16, float32")]
    with mlflow.start_run(experiment_id=experiment):
        for directory, options, message in cases:
            with pytest.raises(ApexError, match=message) as error:
                log_compiled_model(directory, **options)
            assert "\n" not in str(error.value)
    assert not mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")


def test_a_compile_from_the_command_line_is_one_run_with_its_stages_inside_and_a_registered_model(
        tmp_path, tiny_model_dir, data_dir, isolated_mlflow):
    out = tmp_path / "vanilla-grpo"
    result = subprocess.run([str(Path(BIN) / "apexdsp"), "compile", "--program", "vanilla", "--optimizer",
                             "grpo(generate_answer:answer)", "--lm", str(tiny_model_dir), "--trainset",
                             str(data_dir / "hotpotqa" / "train.jsonl"), "--limit-train", "2", "--grpo-steps", "1",
                             "--grpo-beta", "0", "--out", str(out), "--json"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MLFLOW_TRACKING_URI": isolated_mlflow})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    client = mlflow.MlflowClient(tracking_uri=isolated_mlflow)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["apexdsp.kind"] == "compile" and parent.data.metrics["compile_seconds"] > 0
    schedule = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [r.data.tags["apexdsp.kind"] for r in schedule] == ["schedule"]
    stages = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{schedule[0].info.run_id}'")
    assert [r.data.tags["apexdsp.kind"] for r in stages] == ["grpo"]
    assert str(client.get_latest_versions("apexdsp-vanilla")[0].version) == "1"
    import pandas as pd

    answers = mlflow.pyfunc.load_model(summary["model_uri"]).predict(pd.DataFrame({"question": ["Who directed Jaws?"]}))
    assert list(answers.columns) == ["answer"] and len(answers) == 1


class Echo(mlflow.pyfunc.PythonModel):
    """A model that is not a compiled apexdsp program."""

    def predict(self, context, model_input, params=None):
        return model_input


@pytest.mark.parametrize("uri", ["models:/apexdsp-nothing/1", "models:/m-0123456789abcdef0123456789abcdef",
                                 "runs:/0123456789abcdef0123456789abcdef/program"])
def test_a_model_uri_that_names_nothing_is_one_line_naming_it(uri, experiment):
    from apexdsp.optimizers.mlflow_model import load_compiled_model

    with pytest.raises(ApexError, match="not found in the tracking store") as error:
        load_compiled_model(uri)
    assert f"MLflow model {uri!r}" in str(error.value) and "\n" not in str(error.value)


def test_a_model_that_is_not_a_compiled_program_is_refused_before_loading(experiment):
    from apexdsp.optimizers.mlflow_model import load_compiled_model

    with mlflow.start_run(experiment_id=experiment):
        uri = mlflow.pyfunc.log_model(name="echo", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
    with pytest.raises(ApexError, match="is not a compiled apexdsp program") as error:
        load_compiled_model(uri)
    assert "\n" not in str(error.value)


def ask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(BIN) / "apexdsp"), "ask", *args], capture_output=True, text=True, timeout=600)


def test_ask_answers_with_a_logged_model_and_names_a_missing_one_in_one_line(compiled, experiment, tiny_model_dir):
    with mlflow.start_run(experiment_id=experiment):
        uri = log_compiled_model(compiled, dtype="float32")
    answered = ask("--model", uri, "--json", QUESTIONS[0])
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert json.loads(answered.stdout)["answer"] == answers_here(compiled, tiny_model_dir, QUESTIONS[:1])[0]

    missing = ask("--model", "models:/apexdsp-nothing/3", QUESTIONS[0])
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: MLflow model 'models:/apexdsp-nothing/3' not found")
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr

    both = ask("--model", uri, "--program", "vanilla", QUESTIONS[0])
    assert both.returncode == 2 and "--model with --program" in both.stderr
