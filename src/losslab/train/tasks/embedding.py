"""``embedding``: a sentence encoder trained on context -> reply pairs from chat records, for
retrieval with in-batch (and optional explicit) negatives. docs/training.md#embedding
describes the pairs, the negatives, the pooling and the retrieval metrics."""

from __future__ import annotations

import hashlib
import os
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from losslab.data.schemas import SCHEMAS
from losslab.errors import UserError
from losslab.eval.ranking import retrieval_metrics
from losslab.eval.report import namespace
from losslab.labels import IGNORE_INDEX
from losslab.losses.composite import LossInputs
from losslab.models import load_model, load_tokenizer
from losslab.train.adapter import TaskForward
from losslab.train.config import EmbeddingConfig, TrainConfig
from losslab.train.task import LossNeeds, LossPlan, TaskRun
from losslab.train.tasks.backbone import model_kwargs
from losslab.train.tasks.batches import collate_texts, encode, eval_batch_size, eval_batches, model_inputs
from losslab.train.tasks.records import SplitRecords, encode_splits, read_splits, sample_limit, skipped_records

LOSS_NEEDS = LossNeeds(
    "embedding",
    ({"name": "info_nce", "temperature": 0.05},),
    frozenset({"anchor", "positive", "negative", "positive_ids", "negative_ids", "num_examples"}),
)


@dataclass(frozen=True)
class Pair:
    conversation: int
    context: str
    reply: str


def conversation_pairs(messages: Sequence[Any], conversation: int, context_turns: int) -> list[Pair]:
    """The (context, reply) pairs of one conversation, in order."""
    turns = [m for m in messages if m.role != "system"]
    pairs = []
    for i, turn in enumerate(turns):
        if turn.role == "assistant" and i > 0:
            start = max(0, i - context_turns) if context_turns else 0
            pairs.append(Pair(conversation, "\n".join(t.content for t in turns[start:i]), turn.content))
    return pairs


def round_robin(groups: Sequence[Sequence[Pair]]) -> list[Pair]:
    """Every group's first item, then every group's second, ..."""
    out: list[Pair] = []
    for depth in range(max((len(g) for g in groups), default=0)):
        out.extend(g[depth] for g in groups if depth < len(g))
    return out


def negative_replies(pairs: Sequence[Pair], pool: Sequence[Pair], seed: int) -> list[str]:
    """For each pair, the reply of a random pair of ``pool`` from another conversation."""
    if len({p.conversation for p in pool}) < 2:
        raise UserError("explicit negatives need pairs from at least 2 conversations")
    rng = random.Random(seed)
    out = []
    for pair in pairs:
        other = pool[rng.randrange(len(pool))]
        while other.conversation == pair.conversation:
            other = pool[rng.randrange(len(pool))]
        out.append(other.reply)
    return out


def pool_states(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str, normalize: bool) -> torch.Tensor:
    """Sentence vectors (B, D) from token states (B, T, D) of right-padded rows."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if how == "mean":
        vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    elif how == "cls":
        vectors = hidden[:, 0]
    else:  # last real token
        last = attention_mask.sum(dim=1).clamp(min=1) - 1
        vectors = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return F.normalize(vectors, dim=-1) if normalize else vectors


def embed(model: torch.nn.Module, batch: dict[str, Any], options: EmbeddingConfig) -> torch.Tensor:
    hidden = model(**model_inputs(batch)).last_hidden_state  # (B, T, D)
    return pool_states(hidden, batch["attention_mask"], options.pooling, options.normalize)


def text_id(input_ids: Sequence[int]) -> int:
    """A 63-bit id of a text's tokens (BLAKE2b): equal tokens, equal id; the same on every
    process, so ids compare across a gathered batch."""
    digest = hashlib.blake2b(array("q", input_ids).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class TripleCollator:
    """One batch of the B contexts, then the B replies (then the B negatives), ``labels`` (B,)
    (one trained item per pair: 0), ``return_loss`` (so the Trainer evaluates a head-less
    model's loss) and, for in-batch negatives (``in_batch``), ``positive_ids`` (B,) and
    ``negative_ids`` (B,): ids of the reply and negative texts (:func:`text_id`), with which
    InfoNCE leaves a reply repeated in the batch (or in another process's batch) out of the
    negatives of the pairs that have it as their positive."""

    pad_id: int
    negatives: bool
    in_batch: bool = False

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        roles = ("anchor", "positive", "negative") if self.negatives else ("anchor", "positive")
        batch: dict[str, Any] = collate_texts([f[role] for role in roles for f in features], self.pad_id)
        batch["labels"] = torch.zeros(len(features), dtype=torch.long)
        batch["return_loss"] = True
        if self.in_batch:
            for role in roles[1:]:
                ids = [text_id(f[role]["input_ids"]) for f in features]
                batch[f"{role}_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


def make_forward(options: EmbeddingConfig) -> TaskForward:
    """The task's forward: anchor, positive (and negative) vectors (B, D) from one batch of
    2B (3B) texts, and ``target_mask`` (B,) False for the pairs whose ``labels`` are -100."""

    def forward(model: torch.nn.Module, batch: dict[str, Any]) -> LossInputs:
        labels = batch["labels"]  # (B,)
        n = labels.shape[0]
        vectors = embed(model, batch, options)  # (2B or 3B, D)
        anchor, positive, negative = vectors[:n], vectors[n : 2 * n], vectors[2 * n :]
        trained = labels != IGNORE_INDEX
        return LossInputs(
            anchor=anchor,
            positive=positive,
            negative=negative if negative.shape[0] else None,
            positive_ids=batch.get("positive_ids"),
            negative_ids=batch.get("negative_ids") if negative.shape[0] else None,
            target_mask=None if bool(trained.all()) else trained,
        )

    return forward


def retrieval_scores(
    queries: torch.Tensor, candidates: torch.Tensor, targets: Sequence[int], ks: Sequence[int]
) -> dict[str, float]:
    """recall@k and MRR of (Q, D) query vectors against (C, D) candidates by cosine similarity."""
    sims = F.normalize(queries.double(), dim=-1) @ F.normalize(candidates.double(), dim=-1).T  # (Q, C)
    return {**retrieval_metrics(sims, torch.tensor(list(targets)), ks=ks), "candidates": int(candidates.shape[0])}


@torch.no_grad()
def embed_texts(
    model: torch.nn.Module,
    encodings: list[dict[str, list[int]]],
    *,
    pad_id: int,
    batch_size: int,
    options: EmbeddingConfig,
) -> torch.Tensor:
    """(N, D) vectors of encoded texts, in batches."""
    features = [{"encoding": e} for e in encodings]
    collator = partial(_collate_encodings, pad_id=pad_id)
    return torch.cat(
        [embed(model, batch, options).float().cpu() for batch in eval_batches(model, features, collator, batch_size)]
    )


def _collate_encodings(features: list[dict], *, pad_id: int) -> dict[str, torch.Tensor]:
    return collate_texts([f["encoding"] for f in features], pad_id)


def evaluate(
    model: torch.nn.Module, dataset: list[dict], split: str, *, pad_id: int, batch_size: int, options: EmbeddingConfig
) -> dict[str, float]:
    """Retrieval metrics of ``split``: every context against every distinct reply."""
    candidates: dict[tuple[int, ...], int] = {}
    targets = [candidates.setdefault(tuple(f["positive"]["input_ids"]), len(candidates)) for f in dataset]
    queries = embed_texts(model, [f["anchor"] for f in dataset], pad_id=pad_id, batch_size=batch_size, options=options)
    replies = embed_texts(
        model, [{"input_ids": list(ids)} for ids in candidates], pad_id=pad_id, batch_size=batch_size, options=options
    )
    return namespace(retrieval_scores(queries, replies, targets, options.recall_at), split)


def loss_needs(config: TrainConfig) -> LossNeeds:
    return LOSS_NEEDS


def metric_names(config: TrainConfig) -> set[str]:
    """The names ``split/metric`` that :func:`evaluate` gives for each split of ``eval.splits``
    (checked against a real evaluation by tests/train/test_metric_names.py)."""
    names = [*(f"recall@{k}" for k in config.embedding.recall_at), "mrr", "candidates"]
    return {f"{split}/{name}" for split in config.eval.splits for name in names}


def in_batch_negatives(plan: LossPlan, processes: int | None = None) -> str | None:
    """Where the InfoNCE terms take their in-batch negatives from, for the log and the summary:
    every process's batch (``gather_across_devices``, the default) or each process's own; None
    without an InfoNCE term. ``processes``: default ``WORLD_SIZE`` (set by torchrun)."""
    gathers = {t.options["gather_across_devices"] for t in plan.checked.terms if t.name == "info_nce"}
    if not gathers:
        return None
    processes = int(os.environ.get("WORLD_SIZE", "1")) if processes is None else processes
    if processes == 1:
        return "the batch"
    if gathers == {True}:
        return f"the batches of all {processes} processes (gather_across_devices)"
    if gathers == {False}:
        return "each process's own batch (gather_across_devices: false)"
    return f"all {processes} processes' batches or each process's own, by term (gather_across_devices)"


def build(config: TrainConfig, plan: LossPlan) -> TaskRun:
    from transformers import AutoModel

    options = config.embedding
    needs_negative = plan.requires("negative")
    negatives = needs_negative if options.negatives is None else options.negatives
    if needs_negative and not negatives:
        raise UserError(
            "a loss term needs explicit negatives; set embedding.negatives: true", where="embedding.negatives"
        )
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    splits = read_splits(config, SCHEMAS["chat"])
    max_length, reply_drop = config.data.max_length, config.data.truncation

    def encode_split(split: str, records: SplitRecords) -> tuple[list[dict], int]:
        every = round_robin(
            [conversation_pairs(r.messages, i, options.context_turns) for i, r in enumerate(records.records)]
        )
        pairs = every[: sample_limit(config, split)]
        if not pairs:
            raise UserError(
                f"no context -> reply pairs in the {split} records (no assistant turn after another turn)",
                where=records.path,
            )
        replies = negative_replies(pairs, every, config.seed) if negatives else None
        features, truncated = [], 0
        for i, pair in enumerate(pairs):
            anchor, cut_a = encode(tokenizer, pair.context, max_length=max_length, drop="start")
            positive, cut_p = encode(tokenizer, pair.reply, max_length=max_length, drop=reply_drop)
            feature = {"anchor": anchor, "positive": positive}
            if replies is not None:
                feature["negative"] = encode(tokenizer, replies[i], max_length=max_length, drop=reply_drop)[0]
            truncated += cut_a or cut_p
            features.append(feature)
        return features, truncated

    datasets, lines = encode_splits(splits, encode_split)
    model = load_model(AutoModel, config.model, **model_kwargs(config))
    in_batch = plan.uses("info_nce")  # the other replies are negatives
    collator = TripleCollator(tokenizer.pad_token_id, negatives, in_batch=in_batch)
    forward = make_forward(options)

    print(f"explicit negatives: {'yes' if negatives else 'no (in-batch only)'}")
    shared = in_batch_negatives(plan)
    if shared is not None:
        print(f"in-batch negatives: {shared}")
    return TaskRun(
        model=model,
        tokenizer=tokenizer,
        train=datasets["train"],
        validation=datasets.get("validation"),
        test=datasets.get("test"),
        collator=collator,
        forward=forward,
        evaluate=partial(evaluate, pad_id=tokenizer.pad_token_id, batch_size=eval_batch_size(config), options=options),
        summary={
            "task": "embedding",
            "negatives": negatives,
            "pooling": options.pooling,
            "in_batch_negatives": shared,
            "data": lines,
            "skipped": skipped_records(splits),
        },
    )
