"""token_classification: first-sub-token label alignment and the entity report by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from losslab.labels import IGNORE_INDEX as IGNORE
from losslab.models import load_tokenizer
from losslab.train.task import plan_loss
from losslab.train.tasks.batches import encode
from losslab.train.tasks.token_classification import TokenCollator, align_labels, evaluate

TAGS = ["O", "B-PER", "I-PER", "B-LOC"]


def test_align_labels_first_sub_token_only() -> None:
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert align_labels(word_ids, [3, 4, 5]) == [IGNORE, 3, IGNORE, 4, 5, IGNORE, IGNORE, IGNORE]


@pytest.fixture(scope="module")
def bert_tokenizer():
    return load_tokenizer("builtin:minilm-l6")


def test_alignment_on_a_real_tokenizer(bert_tokenizer) -> None:
    words = ["@paulwalk", "Empire", "State", "rocks"]
    tags = [0, 3, 2, 0]
    enc, cut = encode(bert_tokenizer, words, max_length=32, is_split_into_words=True)
    labels = align_labels(enc.pop("word_ids"), tags)
    assert not cut
    assert len(labels) == len(enc["input_ids"])
    assert [x for x in labels if x != IGNORE] == tags  # every word labelled exactly once, in order
    first = bert_tokenizer.convert_ids_to_tokens(enc["input_ids"])
    scored = [tok for tok, x in zip(first, labels) if x != IGNORE]
    assert scored == ["@", "empire", "state", "rocks"]  # '@paulwalk' -> '@', 'paul', '##walk': the first piece


def test_truncation_drops_the_words_that_do_not_fit(bert_tokenizer) -> None:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    enc, cut = encode(bert_tokenizer, words, max_length=5, is_split_into_words=True)
    labels = align_labels(enc.pop("word_ids"), list(range(8)))
    assert cut and len(enc["input_ids"]) == 5
    assert [x for x in labels if x != IGNORE] == [0, 1, 2]  # [CLS] one two three [SEP]


class TokenTable(torch.nn.Module):
    """A stand-in tagger: the logits at a position are ``table[token id]``."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def test_entity_report_by_hand() -> None:
    # token id -> predicted tag (logit 2 on it, 0 elsewhere); id 0 = special / padding, 5 = a continuation piece
    predicted = {0: "O", 1: "B-PER", 2: "I-PER", 3: "O", 4: "B-LOC", 5: "O"}
    table = [[2.0 if TAGS[c] == predicted[i] else 0.0 for c in range(4)] for i in range(6)]
    t = {tag: i for i, tag in enumerate(TAGS)}
    dataset = [
        # true B-PER I-PER O, predicted the same: PER right
        {
            "encoding": {"input_ids": [0, 1, 5, 2, 3, 0]},
            "labels": [IGNORE, t["B-PER"], IGNORE, t["I-PER"], t["O"], IGNORE],
        },
        # true O O B-LOC, predicted B-LOC O B-PER: LOC missed, a LOC and a PER that are not there
        {"encoding": {"input_ids": [0, 4, 3, 1, 0]}, "labels": [IGNORE, t["O"], t["O"], t["B-LOC"], IGNORE]},
    ]
    m = evaluate(TokenTable(table), dataset, "test", collator=TokenCollator(pad_id=0), batch_size=2, tags=TAGS)
    assert m["test/precision_micro"] == pytest.approx(1 / 3)  # 1 right of 3 predicted entities
    assert m["test/recall_micro"] == pytest.approx(1 / 2)  # 1 found of 2 true ones
    assert m["test/f1_micro"] == pytest.approx(0.4)
    assert (m["test/precision/PER"], m["test/recall/PER"], m["test/f1/PER"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert m["test/f1/LOC"] == 0.0
    assert m["test/support/LOC"] == 1
    assert m["test/token_accuracy"] == pytest.approx(4 / 6)
    z = math.log(math.exp(2) + 3)  # -log p of the predicted class is z - 2, of any other class z
    assert m["test/loss"] == pytest.approx((4 * (z - 2) + 2 * z) / 6)


def test_collator_pads_labels_with_ignore() -> None:
    batch = TokenCollator(pad_id=9)(
        [
            {"encoding": {"input_ids": [1, 2, 3]}, "labels": [IGNORE, 1, IGNORE]},
            {"encoding": {"input_ids": [4]}, "labels": [2]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE, 1, IGNORE], [2, IGNORE, IGNORE]]


def test_tags_the_entity_metrics_cannot_read_are_refused_before_training(tmp_path, monkeypatch) -> None:
    """BILOU (U-, L-) or bare IO tags would be misread by the entity metrics: refused at build,
    naming the first record that has one, before any model is loaded."""
    import json

    from losslab.errors import UserError
    from losslab.train.config import TrainConfig
    from losslab.train.tasks import token_classification

    monkeypatch.setattr(token_classification, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    path = tmp_path / "ner.jsonl"
    records = [
        {"tokens": ["Ann", "met", "Bob"], "tags": ["B-PER", "O", "B-PER"]},
        {"tokens": ["in", "Paris"], "tags": ["O", "U-LOC"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = TrainConfig.model_validate(
        {
            "task": "token_classification",
            "model": "builtin:minilm-l6",
            "output_dir": str(tmp_path / "out"),
            "data": {"train": str(path)},
        }
    )
    with pytest.raises(UserError, match=rf"{path}:2: field 'tags': tag 'U-LOC' is not BIO or IOBES.*U- -> S-"):
        token_classification.build(config, plan_loss(config))
    records[1]["tags"] = ["O", "S-LOC"]  # IOBES is read
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(
        token_classification, "load_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("loaded"))
    )
    with pytest.raises(RuntimeError, match="loaded"):
        token_classification.build(config, plan_loss(config))


def test_words_keep_their_spaces_on_a_byte_level_bpe(tmp_path) -> None:
    """A byte-level BPE (the tiny Llama's SmolLM2 tokenizer) glues pre-split words together
    (``JohnSmithlives``) unless each word after the first keeps its space: the model must read
    the sentence as it reads running text, with each word's tag on its first sub-token."""
    import json

    from losslab.train.config import TrainConfig
    from losslab.train.tasks.token_classification import build

    words = ["John", "Smith", "lives", "in", "New", "York", "since", "1984", "."]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O", "B-DATE", "O"]
    data = tmp_path / "ner.jsonl"
    data.write_text(json.dumps({"tokens": words, "tags": tags}) + "\n")
    config = TrainConfig(
        task="token_classification",
        model="builtin:tiny-llama",
        output_dir=str(tmp_path / "run"),
        data={"train": str(data), "max_length": 32},
    )
    run = build(config, plan_loss(config))
    feature = run.train[0]
    assert feature["encoding"]["input_ids"] == run.tokenizer(" ".join(words))["input_ids"]
    pieces = run.tokenizer.convert_ids_to_tokens(feature["encoding"]["input_ids"])
    # " 1984" is Ġ 1 9 8 4: its tag goes on "1", the first sub-token with the word's text
    assert pieces[pieces.index("Ġsince") + 1 : pieces.index("Ġsince") + 3] == ["Ġ", "1"]
    assert [p for p, x in zip(pieces, feature["labels"]) if x != IGNORE] == [
        "John",
        "ĠSmith",
        "Ġlives",
        "Ġin",
        "ĠNew",
        "ĠYork",
        "Ġsince",
        "1",
        "Ġ.",
    ]
    assert [run.model.config.id2label[x] for x in feature["labels"] if x != IGNORE] == tags


def test_word_piece_tokenizers_keep_their_words(bert_tokenizer) -> None:
    from losslab.train.tasks.token_classification import joins_words

    assert not joins_words(bert_tokenizer)  # [CLS] new york [SEP]: words stay apart without help
