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
scores of each query against its positive, its own hard negatives and every other passage in the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from apexdsp.indexes.encoder import EncoderShape, base_model_path, colbert_config
from apexdsp.indexes.frozen_states import CachedText, cache_texts, pad_batch, upper_layers
from apexdsp.indexes.triples import TrainingExample


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
    heldout_questions: int = 64  # kept out of training to measure ranking before and after
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

    def __init__(self, config: EncoderTrainingConfig, examples: list[TrainingExample]):
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

        rng = random.Random(config.seed)
        order = list(range(len(examples)))
        rng.shuffle(order)
        held = min(config.heldout_questions, len(examples) // 5)
        self.heldout = [examples[i] for i in order[:held]]
        self.train_examples = [examples[i] for i in order[held:]]
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
                if passage.encoded_text not in self._passage_index:
                    self._passage_index[passage.encoded_text] = len(texts)
                    texts.append(passage.encoded_text)
                    self._passage_titles.append(normalize_title(passage.title))
        questions = list(dict.fromkeys(e.question for e in [*self.train_examples, *self.heldout]))
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

    def count_texts(self) -> int:
        passages = {p.encoded_text for e in [*self.train_examples, *self.heldout] for p in [*e.positives, *e.negatives]}
        return len(passages) + len({e.question for e in [*self.train_examples, *self.heldout]})

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
        rng, order, losses = random.Random(config.seed), [], []
        torch.manual_seed(config.seed)
        self.model.train()
        for step in range(1, config.steps + 1):
            chosen, docs, labels = self._batch(rng, order)
            queries, _ = self._encode([self._queries[e.question] for e in chosen], is_query=True)
            passages, keep = self._encode([self._passages[d] for d in docs], is_query=False)
            scores = maxsim(queries, passages, keep).masked_fill(self._exclusions(chosen, docs, labels), -1e4)
            loss = torch.nn.functional.cross_entropy(scores, torch.tensor(labels))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
        self.model.eval()
        return losses

    def evaluate(self) -> dict[str, float]:
        """Open retrieval among the held-out questions: each ranks the pooled passages of all of them.

        The pool (their gold paragraphs, distractors and mined negatives) is small enough to score
        exhaustively from the cache, and hard: every distractor was chosen to resemble some question.
        Reports gold-title recall@2 and @5 and the MRR of the first gold passage.
        """
        if not self.heldout:
            return {}
        pool = list(dict.fromkeys(self._passage_index[p.encoded_text]
                                  for e in self.heldout for p in [*e.positives, *e.negatives]))
        was_training = self.model.training
        self.model.eval()
        recall2 = recall5 = mrr = 0.0
        with torch.no_grad():
            docs, keeps = [], []
            for start in range(0, len(pool), 64):
                vectors, keep = self._encode([self._passages[i] for i in pool[start:start + 64]], is_query=False)
                docs.append(vectors)
                keeps.append(keep)
            width = max(d.shape[1] for d in docs)
            docs = torch.cat([torch.nn.functional.pad(d, (0, 0, 0, width - d.shape[1])) for d in docs])
            keeps = torch.cat([torch.nn.functional.pad(k, (0, width - k.shape[1])) for k in keeps])
            for example in self.heldout:
                query, _ = self._encode([self._queries[example.question]], is_query=True)
                ranking = maxsim(query, docs, keeps)[0].argsort(descending=True).tolist()
                titles = [self._passage_titles[pool[i]] for i in ranking]
                found = [t in example.gold_titles for t in titles]
                recall2 += len({t for t in titles[:2] if t in example.gold_titles}) / len(example.gold_titles)
                recall5 += len({t for t in titles[:5] if t in example.gold_titles}) / len(example.gold_titles)
                mrr += 1.0 / (1 + found.index(True)) if True in found else 0.0
        self.model.train(was_training)
        n = len(self.heldout)
        return {"heldout_recall_at_2": recall2 / n, "heldout_recall_at_5": recall5 / n, "heldout_mrr": mrr / n}

    def save(self, folder) -> None:
        """colbert's own checkpoint format: HF weights + linear, tokenizer, ``artifact.metadata``."""
        self.model.eval()
        self.model.save(str(folder))
