"""Train a ColBERT encoder from all-MiniLM-L6-v2 on question / gold paragraph / hard negative examples.

colbert-ai's own trainer wraps the model in ``DistributedDataParallel`` with a CUDA device id and CUDA
mixed precision, so it does not run on a CPU-only machine. This is the short loop that replaces it,
built on colbert's own pieces so that what is trained is exactly what the indexer and searcher later
load: colbert's ``ColBERT`` model class (``HF_ColBERT`` + the ``linear`` projection), its query and
document tokenizers (``[unused0]``/``[unused1]`` markers, [MASK] query augmentation, punctuation
skiplist), its MaxSim scoring, saved with colbert's ``save`` into its checkpoint format.

Why it is fast enough for two CPU cores: the lower transformer layers are frozen and their outputs
cached once (:mod:`.frozen_states`), so a step trains only the top ``train_layers`` layers and the
projection. The projection starts from the principal components of MiniLM's token vectors rather than
at random, so even a short run starts from a sensible geometry. The loss is cross-entropy over MaxSim
scores of each query against its positive, its own hard negatives and every other passage in the batch,
optionally plus a KL term towards a dense (+ BM25) teacher over the same candidates
(:mod:`.distillation`), which keeps the small supervised set from wearing away what MiniLM knew.
Held-out questions of each training file (chosen by a hash of their text) rank one open pool, their own
passages plus random passages of each corpus, every ``eval_every`` steps, and the weights of the best step
(by held-out recall@5, averaged over the files) are kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from apexdsp.indexes.encoder import EncoderShape, base_model_path, colbert_config
from apexdsp.indexes.heldout import heldout_rank, maxsim_matrix
from apexdsp.indexes.frozen_states import CachedText, cache_texts, pad_batch, upper_layers
from apexdsp.indexes.distillation import Teacher, distillation_loss
from apexdsp.indexes.triples import TrainingExample, TrainPassage


@dataclass
class EncoderTrainingConfig:
    """How the encoder is trained. The defaults train on HotpotQA in minutes on two CPU cores."""

    steps: int = 1000
    batch_size: int = 16  # questions per step; every other question's passages are in-batch negatives
    negatives_per_query: int = 2  # hard negatives per question per step, taken from each pool in turn
    distractors_per_question: int = 3
    mined_per_question: int = 2  # BM25-mined
    index_mined_per_question: int = 0  # mined with an earlier ColBERT index (``mining_index``)
    train_layers: int = 0  # top transformer layers trained with the projection; the rest frozen and cached
    lr_projection: float = 1e-3
    lr_encoder: float = 3e-5
    warmup_fraction: float = 0.1
    heldout_questions: int = 64  # of each file (at most a quarter), kept out of training: ranking, model selection
    heldout_random_passages: int = 0  # random passages of each file's corpus added to the held-out pool
    self_supervised_per_corpus: int = 0  # title / sentence -> passage pairs drawn from each file's corpus
    eval_every: int = 0  # rank the held-out pool every N steps and keep the best weights (0: keep the last)
    distill_weight: float = 0.0  # weight of KL(teacher || student) beside the cross-entropy on gold
    teacher_bm25_weight: float = 1.0  # BM25's share in the teacher (0: dense MiniLM alone)
    teacher_temperature: float = 0.5
    pca_sample: int = 512  # passages whose token vectors initialise the projection
    seed: int = 0
    limit_per_file: int | None = None
    shape: EncoderShape = field(default_factory=EncoderShape)

    def as_params(self) -> dict:
        params = asdict(self)
        params.update({f"shape.{k}": v for k, v in params.pop("shape").items()})
        return params


def maxsim(queries: torch.Tensor, docs: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
    """ColBERT's late interaction: ``[q, n]`` = sum over query tokens of the best-matching doc token."""
    similarity = torch.einsum("qid,njd->qnij", queries, docs)
    similarity = similarity.masked_fill(~doc_mask[None, :, None, :], -1e4)
    return similarity.max(-1).values.sum(-1)


class EncoderTrainer:
    """Holds the model, the frozen-layer cache and the examples; one job: produce trained weights."""

    def __init__(self, config: EncoderTrainingConfig, examples: list[TrainingExample],
                 pool_passages: list[TrainPassage] | None = None):
        from colbert.modeling.colbert import ColBERT
        from colbert.modeling.tokenization import DocTokenizer, QueryTokenizer
        from transformers.utils import logging as hf_logging

        from apexdsp.indexes.encoder import quiet_colbert

        self.config = config
        torch.manual_seed(config.seed)
        base = base_model_path()
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "linear.weight newly initialized": expected, init_projection sets it
        try:
            with quiet_colbert():
                self.model = ColBERT(name=str(base), colbert_config=colbert_config(base, config.shape))
        finally:
            hf_logging.set_verbosity(verbosity)
        n_layers = len(self.model.bert.encoder.layer)
        if not 0 <= config.train_layers <= n_layers:
            raise ValueError(f"train_layers must be between 0 and {n_layers}")
        self.start_layer = n_layers - config.train_layers
        self.query_tokenizer = QueryTokenizer(self.model.colbert_config, verbose=0)
        self.doc_tokenizer = DocTokenizer(self.model.colbert_config)
        self.skip_ids = torch.tensor(sorted(t for t in self.model.skiplist if isinstance(t, int)))

        self.heldout, self.train_examples = split_heldout(examples, config.heldout_questions, config.seed)
        self.pool_passages = list(pool_passages or [])  # extra passages the held-out questions search among
        self.teacher: Teacher | None = None  # set by the caller when config.distill_weight > 0
        self.history: list[dict] = []
        self._passage_index: dict[str, int] = {}
        self._passage_titles: list[str] = []
        self._passages: list[CachedText] = []
        self._queries: dict[str, CachedText] = {}

    # -- the frozen part --------------------------------------------------------------------------
    def prepare(self, progress: Callable[[int], None] | None = None, cache_dir: Path | None = None) -> int:
        """Tokenise every question and passage once and cache the frozen layers' outputs.

        With ``cache_dir`` the outputs are also kept on disk, keyed by a hash of the texts, the encoder
        shape and the number of frozen layers: a second training run on the same data (another seed,
        more steps) skips this, the slowest phase.
        """
        from apexdsp.metrics.retrieval import normalize_title

        texts: list[str] = []
        for example in [*self.train_examples, *self.heldout]:
            for passage in [*example.positives, *example.negatives]:
                self._add_passage(passage, texts)
        for passage in self.pool_passages:
            self._add_passage(passage, texts)
        questions = self.question_texts()
        stored = None
        if cache_dir is not None:
            key = hashlib.sha256(json.dumps([texts, questions, asdict(self.config.shape), self.start_layer,
                                             str(base_model_path())]).encode()).hexdigest()[:16]
            stored = Path(cache_dir) / f"frozen-states-{key}.pt"
            if stored.is_file():
                self._passages, cached_queries = torch.load(stored, weights_only=False)
                self._queries = dict(zip(questions, cached_queries))
                if progress is not None:
                    progress(len(texts) + len(questions))
                return len(texts) + len(questions)
        bert = self.model.bert
        self._passages = cache_texts(bert, self.doc_tokenizer.tensorize(texts), self.start_layer, progress=progress)
        cached_queries = cache_texts(bert, self.query_tokenizer.tensorize(questions), self.start_layer,
                                     full_width=True, progress=progress)
        self._queries = dict(zip(questions, cached_queries))
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            tmp = stored.with_suffix(f".tmp-{os.getpid()}")
            torch.save((self._passages, cached_queries), tmp)
            os.replace(tmp, stored)
        return len(texts) + len(questions)

    def _add_passage(self, passage: TrainPassage, texts: list[str]) -> None:
        from apexdsp.metrics.retrieval import normalize_title

        if passage.encoded_text not in self._passage_index:
            self._passage_index[passage.encoded_text] = len(texts)
            texts.append(passage.encoded_text)
            self._passage_titles.append(normalize_title(passage.title))

    def question_texts(self) -> list[str]:
        return list(dict.fromkeys(e.question for e in [*self.train_examples, *self.heldout]))

    def passage_texts(self) -> list[str]:
        """Cached passages in cache order (after :meth:`prepare`): what teacher scores are indexed by."""
        return list(self._passage_index)

    def count_texts(self) -> int:
        passages = {p.encoded_text for e in [*self.train_examples, *self.heldout] for p in [*e.positives, *e.negatives]}
        passages |= {p.encoded_text for p in self.pool_passages}
        return len(passages) + len(self.question_texts())

    # -- the trainable part ------------------------------------------------------------------------
    def _encode(self, items: list[CachedText], is_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids, states, mask = pad_batch(items)
        hidden = upper_layers(self.model.bert, states, mask, self.start_layer)
        vectors = self.model.linear(hidden)
        if is_query:  # every position counts, [MASK] augmentation included (as colbert's query())
            keep = ids != 0
        else:  # real tokens that are not punctuation (as colbert's doc() with mask_punctuation)
            keep = (mask.bool()) & ~torch.isin(ids, self.skip_ids)
        vectors = torch.nn.functional.normalize(vectors * keep.unsqueeze(-1), p=2, dim=-1)
        return vectors, keep

    def init_projection(self) -> None:
        """Set ``linear`` to the top principal directions of MiniLM's final token vectors, mean removed."""
        rng = random.Random(self.config.seed + 1)
        sample = rng.sample(range(len(self._passages)), min(self.config.pca_sample, len(self._passages)))
        vectors = []
        with torch.no_grad():
            for start in range(0, len(sample), 32):
                items = [self._passages[i] for i in sample[start:start + 32]]
                ids, states, mask = pad_batch(items)
                hidden = upper_layers(self.model.bert, states, mask, self.start_layer)
                vectors.append(hidden[mask.bool() & ~torch.isin(ids, self.skip_ids)])
        tokens = torch.cat(vectors).double()
        mean = tokens.mean(0)
        _, eigenvectors = torch.linalg.eigh(torch.cov((tokens - mean).T))
        components = eigenvectors[:, -self.config.shape.dim:].flip(-1).T  # (dim, hidden), largest first
        unit_mean = mean / mean.norm()
        weight = components @ (torch.eye(mean.numel(), dtype=torch.float64) - torch.outer(unit_mean, unit_mean))
        self.model.linear.weight.data.copy_(weight.float())

    def _batch(self, rng: random.Random, order: list[int]) -> tuple[list[TrainingExample], list[int], list[int]]:
        """Questions for one step, the passages (positives then negatives) and each question's label."""
        while len(order) < self.config.batch_size:
            refill = list(range(len(self.train_examples)))
            rng.shuffle(refill)
            order.extend(refill)
        chosen = [self.train_examples[order.pop(0)] for _ in range(self.config.batch_size)]
        docs, labels = [], []
        for example in chosen:
            labels.append(len(docs))
            docs.append(self._passage_index[rng.choice(example.positives).encoded_text])
            pools = [pool for pool in example.pools.values() if pool]
            picked: list[int] = []
            for n in range(self.config.negatives_per_query if pools else 0):
                candidates = [self._passage_index[p.encoded_text] for p in pools[n % len(pools)]]
                candidates = [c for c in candidates if c not in picked]
                if candidates:
                    picked.append(rng.choice(candidates))
            docs.extend(picked)
        return chosen, docs, labels

    def _exclusions(self, chosen: list[TrainingExample], docs: list[int], labels: list[int]) -> torch.Tensor:
        """Passages that are gold for a question but not its label: neither positive nor negative."""
        excluded = torch.zeros(len(chosen), len(docs), dtype=torch.bool)
        for row, example in enumerate(chosen):
            for col, doc in enumerate(docs):
                if col != labels[row] and self._passage_titles[doc] in example.gold_titles:
                    excluded[row, col] = True
        return excluded

    def train(self, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """Run ``steps`` optimisation steps; returns the loss of each step."""
        config = self.config
        from transformers import get_linear_schedule_with_warmup

        for parameter in self.model.parameters():
            parameter.requires_grad = False
        encoder_params = [p for layer in self.model.bert.encoder.layer[self.start_layer:] for p in layer.parameters()]
        for parameter in [*encoder_params, self.model.linear.weight]:
            parameter.requires_grad = True
        groups = [{"params": [self.model.linear.weight], "lr": config.lr_projection}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": config.lr_encoder})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        schedule = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * config.steps), config.steps)
        rng, order, losses, best = random.Random(config.seed), [], [], {}
        torch.manual_seed(config.seed)
        self.model.train()
        for step in range(1, config.steps + 1):
            chosen, docs, labels = self._batch(rng, order)
            queries, _ = self._encode([self._queries[e.question] for e in chosen], is_query=True)
            passages, keep = self._encode([self._passages[d] for d in docs], is_query=False)
            scores = maxsim(queries, passages, keep).masked_fill(self._exclusions(chosen, docs, labels), -1e4)
            loss = torch.nn.functional.cross_entropy(scores, torch.tensor(labels))
            if self.teacher is not None and config.distill_weight > 0:
                excluded = self._exclusions(chosen, docs, labels)
                targets = self.teacher.logits([e.question for e in chosen], docs, excluded)
                loss = loss + config.distill_weight * distillation_loss(scores, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                self._checkpoint(step, best)
        if best:
            self.model.load_state_dict(best["state"])
        self.model.eval()
        return losses

    def _checkpoint(self, step: int, best: dict) -> None:
        """Rank the held-out pool; remember these weights if they are the best so far (by recall@5, then MRR)."""
        metrics = self.evaluate()
        self.history.append({"step": step, **metrics})
        key = _selection_key(metrics)
        if not best or key > best["key"]:
            best.update(key=key, step=step, state=copy.deepcopy(self.model.state_dict()))

    def evaluate(self, baselines: bool = False) -> dict[str, float]:
        """Open retrieval among the held-out questions: each ranks the pooled passages of all of them.

        The pool (their gold paragraphs, distractors and mined negatives, plus the random corpus passages
        given to the trainer) is small enough to score exhaustively from the cache, and hard: every
        distractor was chosen to resemble some question. Reports gold-title recall@2 and @5 and the MRR
        of the first gold passage; with ``baselines`` (and a teacher) also the teacher's dense and BM25
        signals ranking the same pool, so that the encoder is compared with them on equal terms.
        """
        if not self.heldout:
            return {}
        pool = list(dict.fromkeys([self._passage_index[p.encoded_text]
                                   for e in self.heldout for p in [*e.positives, *e.negatives]]
                                  + [self._passage_index[p.encoded_text] for p in self.pool_passages]))
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            docs, keeps = [], []
            for start in range(0, len(pool), 64):
                vectors, keep = self._encode([self._passages[i] for i in pool[start:start + 64]], is_query=False)
                docs.append(vectors)
                keeps.append(keep)
            width = max(d.shape[1] for d in docs)
            docs = torch.cat([torch.nn.functional.pad(d, (0, 0, 0, width - d.shape[1])) for d in docs])
            keeps = torch.cat([torch.nn.functional.pad(k, (0, width - k.shape[1])) for k in keeps])
            queries = torch.cat([self._encode([self._queries[e.question] for e in self.heldout[start:start + 64]],
                                              is_query=True)[0] for start in range(0, len(self.heldout), 64)])
            metrics = self._rank_metrics(maxsim_matrix(queries, docs, keeps), pool, "heldout")
        self.model.train(was_training)
        if baselines and self.teacher is not None:
            rows = torch.tensor([self.teacher.row[e.question] for e in self.heldout])
            metrics |= self._rank_metrics(self.teacher.dense[rows][:, pool].float().numpy(), pool, "dense")
            if self.teacher.bm25 is not None:
                metrics |= self._rank_metrics(self.teacher.bm25[rows][:, pool].float().numpy(), pool, "bm25")
        return metrics

    def _rank_metrics(self, scores, pool: list[int], prefix: str) -> dict[str, float]:
        """recall@2, recall@5 and MRR of each training file's held-out questions (``{prefix}_{file}_...``);
        ``{prefix}_...`` is their mean over files, so that a small data set weighs as much as a large one."""
        per_source: dict[str, list[tuple[float, float, float]]] = {}
        for example, row in zip(self.heldout, scores):
            ranking = (-row).argsort(kind="stable")[:50].tolist()
            titles = [self._passage_titles[pool[i]] for i in ranking]
            found = [t in example.gold_titles for t in titles]
            per_source.setdefault(source_name(example.source), []).append((
                len({t for t in titles[:2] if t in example.gold_titles}) / len(example.gold_titles),
                len({t for t in titles[:5] if t in example.gold_titles}) / len(example.gold_titles),
                1.0 / (1 + found.index(True)) if True in found else 0.0))
        names = ("recall_at_2", "recall_at_5", "mrr")
        metrics = {}
        for source, rows in per_source.items():
            means = [sum(column) / len(rows) for column in zip(*rows)]
            if len(per_source) > 1:
                metrics |= {f"{prefix}_{source}_{name}": value for name, value in zip(names, means)}
            for name, value in zip(names, means):
                metrics[f"{prefix}_{name}"] = metrics.get(f"{prefix}_{name}", 0.0) + value / len(per_source)
        return metrics

    def final_metrics(self) -> dict[str, float]:
        """The held-out ranking of the weights :meth:`train` kept: the best checked step's, already measured
        (no second pass over the pool), or a fresh :meth:`evaluate` when no step was checked."""
        if not self.history:
            return self.evaluate()
        return {k: v for k, v in self._best_point().items() if k != "step"}

    def _best_point(self) -> dict:
        """The checked step with the best held-out recall@5, then MRR (the first of equals, as in training)."""
        return max(self.history, key=_selection_key)

    @property
    def best_step(self) -> int | None:
        if not self.history:
            return None
        return self._best_point()["step"]

    def save(self, folder) -> None:
        """colbert's own checkpoint format: HF weights + linear, tokenizer, ``artifact.metadata``."""
        self.model.eval()
        self.model.save(str(folder))


def _selection_key(metrics: dict) -> tuple[float, float]:
    """How checked steps are compared: held-out recall@5 (mean over files), then MRR."""
    return metrics.get("heldout_recall_at_5", 0.0), metrics.get("heldout_mrr", 0.0)


def split_heldout(examples: list[TrainingExample], n: int, seed: int) -> tuple[list[TrainingExample], list]:
    """``(heldout, train)``: up to ``n`` (at most a quarter) of each training file's questions, by a seeded hash
    of the question text, so a file's slice is the same whichever other files are trained on (and matches
    :func:`apexdsp.indexes.heldout.heldout_split`). Self-supervised examples are never held out."""
    held: set[int] = set()
    sources = dict.fromkeys(e.source for e in examples if not e.self_supervised)
    for source in sources:
        own = [e for e in examples if e.source == source and not e.self_supervised]
        ranked = sorted(own, key=lambda e: heldout_rank(e.question, seed))
        held |= {id(e) for e in ranked[:min(n, len(own) // 4)]}
    return [e for e in examples if id(e) in held], [e for e in examples if id(e) not in held]


def source_name(source: str) -> str:
    """A short name for a training file in metric names: its folder (``hotpotqa``), else its stem."""
    path = Path(source)
    return path.parent.name or path.stem
