"""``apexdsp index``: train the ColBERT encoder, build an index, search it, evaluate it against baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from apexdsp.errors import ApexError

app = typer.Typer(no_args_is_help=True, help="ColBERT retrieval: train-encoder, build, search, eval.")
console = Console()


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ApexError(f"-k takes comma-separated positive integers like 1,2,5,10,20, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise ApexError(f"-k takes comma-separated positive integers like 1,2,5,10,20, got {text!r}")
    return ks


@app.command("train-encoder")
def train_encoder_cmd(
    train: Annotated[list[Path], typer.Option("--train", help="Training questions (JSONL); repeat for more files.")],
    out: Annotated[Path, typer.Option(help="Folder to write the ColBERT checkpoint to.")],
    mining_corpus: Annotated[Optional[list[Path]], typer.Option(
        help="Corpus to mine BM25 negatives from, one per --train in order (default: corpus.jsonl beside it).")] = None,
    steps: Annotated[int, typer.Option(min=1)] = 1000,
    batch_size: Annotated[int, typer.Option(min=2)] = 16,
    train_layers: Annotated[int, typer.Option(min=0, max=6, help="Top layers trained (0: projection only).")] = 0,
    distractors: Annotated[int, typer.Option(min=0, help="Distractor paragraphs kept per question.")] = 3,
    mined: Annotated[int, typer.Option(min=0, help="BM25-mined negatives per question.")] = 2,
    mining_index: Annotated[Optional[Path], typer.Option(
        help="An earlier ColBERT index over the training corpus: its top non-gold hits become negatives.")] = None,
    index_mined: Annotated[int, typer.Option(min=0, help="Negatives per question mined with --mining-index.")] = 0,
    negatives: Annotated[int, typer.Option(min=0, help="Hard negatives per question per step.")] = 2,
    lr_projection: Annotated[float, typer.Option(min=0)] = 1e-3,
    lr_encoder: Annotated[float, typer.Option(min=0)] = 3e-5,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N questions of each file.")] = None,
    heldout: Annotated[int, typer.Option(min=0, help=(
        "Questions of each --train file (at most a quarter) held out for selection, never trained on."))] = 64,
    self_supervised: Annotated[int, typer.Option(min=0, help=(
        "Self-supervised pairs drawn from each --train file's corpus (a title or a sentence as the query "
        "for its passage)."))] = 0,
    heldout_random: Annotated[int, typer.Option(
        min=0, help="Random corpus passages added to the held-out pool (an open search).")] = 0,
    eval_every: Annotated[int, typer.Option(
        min=0, help="Rank the held-out pool every N steps and keep the best weights (0: keep the last).")] = 0,
    distill: Annotated[float, typer.Option(min=0, help="Weight of the KL term towards the teacher (0: off).")] = 0.0,
    teacher_bm25: Annotated[float, typer.Option(min=0, help="BM25's weight in the teacher (0: dense alone).")] = 1.0,
    teacher_temperature: Annotated[float, typer.Option(min=0.01)] = 0.5,
    warmup: Annotated[float, typer.Option(min=0, max=1, help="Fraction of steps of linear warm-up.")] = 0.1,
    seed: int = 0,
    threads: Annotated[int, typer.Option(min=1)] = 2,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
    reuse_cache: Annotated[bool, typer.Option(help="Keep/reuse the frozen-layer outputs in .apexdsp/cache.")] = True,
) -> None:
    """Train a ColBERT encoder from all-MiniLM-L6-v2 (colbert-ai checkpoint format)."""
    from apexdsp.indexes.encoder_job import train_encoder
    from apexdsp.indexes.encoder_training import EncoderTrainingConfig

    if mining_corpus and len(mining_corpus) != len(train):
        raise ApexError(f"--mining-corpus given {len(mining_corpus)} times for {len(train)} --train files")
    corpora = {str(t): c for t, c in zip(train, mining_corpus)} if mining_corpus else None
    config = EncoderTrainingConfig(steps=steps, batch_size=batch_size, train_layers=train_layers,
                                   distractors_per_question=distractors, mined_per_question=mined,
                                   index_mined_per_question=index_mined if mining_index else 0,
                                   negatives_per_query=negatives,
                                   limit_per_file=limit, seed=seed, lr_projection=lr_projection, lr_encoder=lr_encoder,
                                   heldout_questions=heldout, heldout_random_passages=heldout_random,
                                   self_supervised_per_corpus=self_supervised,
                                   eval_every=eval_every, distill_weight=distill, teacher_bm25_weight=teacher_bm25,
                                   teacher_temperature=teacher_temperature, warmup_fraction=warmup)
    from apexdsp.paths import cache_dir

    result = train_encoder([str(t) for t in train], out, config, corpora=corpora, track=track, threads=threads,
                           cache_dir=cache_dir("cache") if reuse_cache else None, mining_index=mining_index)
    record = result.record
    console.print(f"encoder: {result.path} (fingerprint {result.fingerprint})")
    console.print(f"held-out ranking before {record['heldout_before']} after {record['heldout_after']}")
    if record["selection"]["best_step"] is not None:
        console.print(f"kept the weights of step {record['selection']['best_step']} (best held-out recall@5)")
    console.print(f"time: {record['timings']['total_s']:.0f}s "
                  f"(cache {record['timings']['cache_s']:.0f}s, train {record['timings']['train_s']:.0f}s)")


@app.command()
def build(
    corpus: Annotated[Path, typer.Option(help="Corpus JSONL: {id, title, text} per line.")],
    encoder: Annotated[Path, typer.Option(help="Trained encoder folder (from train-encoder).")],
    out: Annotated[Path, typer.Option(help="Index folder (replaced only once the new one is complete).")],
    nbits: Annotated[int, typer.Option(help="Bits per residual dimension: 1, 2, 4 or 8.")] = 2,
    partitions: Annotated[Optional[int], typer.Option(
        help="k-means centroids (a power of two; default: colbert's 2^floor(log2(16*sqrt(embeddings)))).")] = None,
    threads: Annotated[int, typer.Option(min=1)] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Build a colbert-ai (PLAID) index over a corpus, on CPU."""
    from apexdsp.indexes.colbert_index import build_index

    manifest = build_index(corpus, encoder, out, nbits=nbits, threads=threads, partitions=partitions)
    if as_json:
        print(json.dumps(manifest.model_dump()))
        return
    console.print(f"index: {out}  {manifest.passages:,} passages in {manifest.build_seconds:.0f}s "
                  f"({manifest.passages_per_second:.1f} passages/s), {manifest.index_bytes / 2**20:.1f} MiB "
                  f"({manifest.bytes_per_passage:.0f} bytes/passage)")


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="The search query.")],
    index: Annotated[Path, typer.Option(help="Index folder (from build).")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Passages to return.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as JSON.")] = False,
) -> None:
    """Search an index and print the top-k passages."""
    from apexdsp.indexes.colbert_retriever import load_retriever

    hits = load_retriever(index).search(query, k=k)
    if as_json:
        print(json.dumps([hit.model_dump() for hit in hits]))
        return
    table = Table(title=f"top {k} for {query!r}")
    for column in ("rank", "score", "id", "title", "text"):
        table.add_column(column, overflow="fold" if column == "text" else "ellipsis")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.2f}", hit.pid, hit.title, hit.text[:160])
    console.print(table)


@app.command("eval")
def eval_cmd(
    index: Annotated[Path, typer.Option(help="Index folder (from build).")],
    questions: Annotated[Path, typer.Option(help="Questions JSONL with supporting_titles.")],
    k: Annotated[str, typer.Option("-k", "--k", help="Cut-offs, comma-separated.")] = "1,2,5,10,20",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate the first N questions.")] = None,
    heldout_of: Annotated[Optional[Path], typer.Option(help=(
        "An encoder folder: evaluate only the questions it held out of its training (the question file "
        "must be one of its --train files)."))] = None,
    baselines: Annotated[bool, typer.Option(help="Also evaluate BM25 and dense MiniLM on the same corpus.")] = True,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
    threads: Annotated[int, typer.Option(min=1)] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Recall@k, all-gold@k, MRR and latency of the index, side by side with BM25 and dense MiniLM."""
    from apexdsp.indexes.evaluation import evaluate_retrieval

    ks = _parse_ks(k)
    report = evaluate_retrieval(index, questions, ks=ks, limit=limit, baselines=baselines, track=track,
                                progress=not as_json, threads=threads, heldout_of=heldout_of)
    if as_json:
        print(json.dumps(report.summary()))
        return
    table = Table(title=f"retrieval on {questions} ({report.n_questions} questions, {report.corpus})")
    table.add_column("metric")
    for name in report.retrievers:
        table.add_column(name, justify="right")
    rows = [(f"recall@{k}", lambda s, k=k: s.recall_at[k]) for k in report.ks]
    rows += [(f"all-gold@{k}", lambda s, k=k: s.all_gold_at[k]) for k in report.ks]
    rows += [("MRR", lambda s: s.mrr), ("latency p50 ms", lambda s: s.latency_ms_p50),
             ("latency p95 ms", lambda s: s.latency_ms_p95), ("batched queries/s", lambda s: s.batch_queries_per_s)]
    for label, get in rows:
        table.add_row(label, *[f"{get(s):.3f}" if "ms" not in label and "/s" not in label else f"{get(s):.1f}"
                               for s in report.retrievers.values()])
    console.print(table)
    console.print(f"load average {report.load_average}")
