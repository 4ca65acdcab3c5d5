"""``token_classification``: named-entity recognition on BIO / IOBES tagged words, each word's
tag on its first sub-token. docs/training.md#token_classification describes the alignment, the
loss inputs and the entity metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F

from losslab.data.schemas import SCHEMAS
from losslab.errors import UserError
from losslab.eval.ner import ids_to_tags, lenient_tag, ner_report
from losslab.eval.report import namespace
from losslab.labels import IGNORE_INDEX
from losslab.losses.composite import LossInputs
from losslab.models import load_model, load_tokenizer
from losslab.train.config import TrainConfig
from losslab.train.task import LossNeeds, LossPlan, TaskRun
from losslab.train.tasks.backbone import model_kwargs, set_pad_token
from losslab.train.tasks.batches import collate_texts, encode, eval_batch_size, eval_batches, model_inputs, pad
from losslab.train.tasks.labels import label_id, label_vocabulary
from losslab.train.tasks.predictions import save_predictions
from losslab.train.tasks.records import SplitRecords, encode_splits, per_record, read_splits, skipped_records

LOSS_NEEDS = LossNeeds(
    "token_classification",
    ({"name": "token_cross_entropy", "weight": 1.0},),
    frozenset({"logits", "labels", "attention_mask", "class_logits", "class_targets", "num_items", "num_examples"}),
)


def align_labels(word_ids: list[int | None], tag_ids: list[int]) -> list[int]:
    """Per sub-token: the tag id of its word on the word's first sub-token, else ``-100``
    (special tokens have word id None)."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(tag_ids[word] if word is not None and word != previous else IGNORE_INDEX)
        if word is not None:
            previous = word
    return labels


def joins_words(tokenizer: Any) -> bool:
    """True when the tokenizer, given pre-split words, drops the spaces between them: a
    byte-level BPE without ``add_prefix_space`` (GPT-2, SmolLM2) reads ``["New", "York"]`` as
    ``NewYork``, tokens the model never saw in running text. WordPiece and SentencePiece
    tokenizers mark word starts themselves."""
    ids = tokenizer(["a", "b"], is_split_into_words=True, add_special_tokens=False)["input_ids"]
    return " " not in tokenizer.decode(ids)


def skip_added_spaces(
    word_ids: list[int | None], input_ids: list[int], is_space: Callable[[int], bool]
) -> list[int | None]:
    """``word_ids`` with a word's first sub-token set to None (not labelled) when it is only the
    space :func:`spaced_words` added (``is_space(token_id)``) and more of the word follows: a
    tokenizer that splits digits from the space reads ``" 1984"`` as ``Ġ 1 9 8 4``, and the tag
    belongs on ``1``, which a left-to-right model reads with the number, not on ``Ġ``, which it
    reads before."""
    out = list(word_ids)
    for i, word in enumerate(word_ids):
        first = word is not None and (i == 0 or word_ids[i - 1] != word)
        more = i + 1 < len(word_ids) and word_ids[i + 1] == word
        if first and more and is_space(input_ids[i]):
            out[i] = None
    return out


def spaced_words(words: list[str]) -> list[str]:
    """The words with the space that precedes each in running text (all but the first), so a
    byte-level BPE tokenises them as it tokenises ``" ".join(words)``."""
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


@dataclass
class TokenCollator:
    """Padded sub-tokens and their ``labels`` (B, T), ``-100`` on padding."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_texts([f["encoding"] for f in features], self.pad_id)
        batch["labels"] = pad([f["labels"] for f in features], IGNORE_INDEX, torch.long)
        return batch


def forward(model: torch.nn.Module, batch: dict[str, Any]) -> LossInputs:
    logits = model(**model_inputs(batch)).logits  # (B, T, C)
    labels = batch["labels"]  # (B, T)
    return LossInputs(
        logits=logits,
        labels=labels,
        attention_mask=batch["attention_mask"],
        class_logits=logits.reshape(-1, logits.shape[-1]),
        class_targets=labels.reshape(-1),
    )


def batch_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(sum of cross-entropy, correct, scored) over the labelled positions of a batch."""
    scored = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits[scored].double(), labels[scored], reduction="sum")
    return float(nll), int((logits.argmax(-1)[scored] == labels[scored]).sum()), int(scored.sum())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: list[dict],
    split: str,
    *,
    collator: TokenCollator,
    batch_size: int,
    tags: list[str],
    output_dir: str | None = None,
) -> dict[str, float]:
    """The metrics of ``split`` (see the module docstring), named ``split/metric``; prints the
    report and writes the predictions into ``output_dir`` (when given)."""
    y_true: list[list[str]] = []
    y_pred: list[list[str]] = []
    nll, correct, scored = 0.0, 0, 0
    for batch in eval_batches(model, dataset, collator, batch_size):
        logits = model(**model_inputs(batch)).logits.float()  # (B, T, C)
        labels = batch["labels"]
        true, pred = ids_to_tags(logits.argmax(-1).cpu(), labels.cpu(), tags)
        y_true += true
        y_pred += pred
        b_nll, b_correct, b_scored = batch_scores(logits, labels)
        nll, correct, scored = nll + b_nll, correct + b_correct, scored + b_scored
    save_predictions(
        output_dir,
        split,
        [{"tokens": f.get("tokens"), "gold": t, "predicted": p} for f, t, p in zip(dataset, y_true, y_pred)],
    )
    report = ner_report(y_true, y_pred)
    print(f"{split} (entities):\n{report}")
    per_token = {"token_accuracy": correct / scored, "loss": nll / scored} if scored else {}
    return namespace({**report.to_dict(), **per_token}, split)


def check_tags(tags: list[str], train: SplitRecords) -> None:
    """Every tag is one the entity metrics read (BIO or IOBES): a BILOU ``U-``/``L-`` or a bare
    IO tag would be misread at the first evaluation, so it is an error here, before training."""
    bad = [t for t in tags if not lenient_tag(t)]
    if not bad:
        return
    where = next((str(src) for src, r in zip(train.sources, train.records) if bad[0] in r.tags), train.path)
    raise UserError(
        f"field 'tags': tag {bad[0]!r} is not BIO or IOBES (O, B-, I-, E-, S-); "
        f"{len(bad)} such tag{'s' * (len(bad) != 1)}: {', '.join(map(repr, bad[:5]))}. "
        "Convert BILOU tags (U- -> S-, L- -> E-) and IO tags (TYPE -> I-TYPE)",
        where=where,
    )


def loss_needs(config: TrainConfig) -> LossNeeds:
    return LOSS_NEEDS


def metric_names(config: TrainConfig) -> set[str]:
    """The names ``split/metric`` that :func:`evaluate` gives for each split of ``eval.splits``;
    a name ending in ``/*`` stands for one name per entity type, known from the data
    (checked against a real evaluation by tests/train/test_metric_names.py)."""
    names = [
        "token_accuracy",
        "loss",
        *(f"{score}_{avg}" for avg in ("micro", "macro", "weighted") for score in ("precision", "recall", "f1")),
        *(f"{score}/*" for score in ("precision", "recall", "f1", "support")),
    ]
    return {f"{split}/{name}" for split in config.eval.splits for name in names}


def build(config: TrainConfig, plan: LossPlan) -> TaskRun:
    from transformers import AutoModelForTokenClassification

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"token_classification needs a fast tokenizer (word ids) for {config.model}")
    splits = read_splits(config, SCHEMAS["ner"])
    tags = label_vocabulary(config.data.label_names, [t for r in splits["train"].records for t in r.tags], first="O")
    check_tags(tags, splits["train"])
    tag2id = {t: i for i, t in enumerate(tags)}
    add_spaces = joins_words(tokenizer)
    is_space = cache(lambda token_id: not str(tokenizer.decode([token_id])).strip())  # a few ids, decoded once

    def encode_record(source: Any, record: Any) -> tuple[dict, bool]:
        tag_ids = [label_id(tag2id, t, source, "tags") for t in record.tags]
        words = spaced_words(list(record.tokens)) if add_spaces else list(record.tokens)
        encoding, cut = encode(
            tokenizer, words, max_length=config.data.max_length, drop=config.data.truncation, is_split_into_words=True
        )
        word_ids = encoding.pop("word_ids")
        if add_spaces:
            word_ids = skip_added_spaces(word_ids, encoding["input_ids"], is_space)
        return {"encoding": encoding, "labels": align_labels(word_ids, tag_ids), "tokens": list(record.tokens)}, cut

    datasets, lines = encode_splits(splits, per_record(config, encode_record))
    model = load_model(
        AutoModelForTokenClassification,
        config.model,
        num_labels=len(tags),
        id2label=dict(enumerate(tags)),
        label2id=tag2id,
        **model_kwargs(config),
    )
    set_pad_token(model, tokenizer)
    collator = TokenCollator(tokenizer.pad_token_id)

    return TaskRun(
        model=model,
        tokenizer=tokenizer,
        train=datasets["train"],
        validation=datasets.get("validation"),
        test=datasets.get("test"),
        collator=collator,
        forward=forward,
        evaluate=partial(
            evaluate, collator=collator, batch_size=eval_batch_size(config), tags=tags, output_dir=config.output_dir
        ),
        summary={"task": "token_classification", "tags": tags, "data": lines, "skipped": skipped_records(splits)},
    )
