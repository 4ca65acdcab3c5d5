"""reward_model: what the model reads (chat template or text pair), batching, metrics by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from losslab.errors import UserError
from losslab.models import load_tokenizer
from losslab.train.config import TrainConfig
from losslab.train.task import plan_loss
from losslab.train.tasks.reward_model import PairCollator, encode_answer, evaluate, forward


@pytest.fixture(scope="module")
def chat_tokenizer():
    return load_tokenizer("builtin:tiny-llama")


def test_chat_template_input_keeps_the_answer_when_cut(chat_tokenizer) -> None:
    prompt, answer = "Write a tweet with a positive tone.", "What a lovely sunny day in the park!"
    full, cut = encode_answer(chat_tokenizer, prompt, answer, max_length=512)
    text = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
    )
    assert not cut
    assert full["input_ids"] == chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    short, cut = encode_answer(chat_tokenizer, prompt, answer, max_length=20)
    assert cut and len(short["input_ids"]) == 20
    assert short["input_ids"] == full["input_ids"][-20:]  # the prompt lost its start; the answer and end of turn stay
    assert chat_tokenizer.decode(short["input_ids"]).endswith(answer + "<|im_end|>\n")


def test_message_prompts_render_as_the_conversation(chat_tokenizer) -> None:
    from losslab.data.schemas import Message

    prompt = [Message(role="system", content="Be kind."), Message(role="user", content="Hi")]
    ids, _ = encode_answer(chat_tokenizer, prompt, "Hello!", max_length=512)
    text = chat_tokenizer.decode(ids["input_ids"])
    assert "Be kind." in text and "Hi" in text and text.endswith("Hello!<|im_end|>\n")


def test_encoder_input_is_a_text_pair() -> None:
    tokenizer = load_tokenizer("builtin:minilm-l6")
    ids, _ = encode_answer(tokenizer, "the prompt", "an answer", max_length=64)
    assert tokenizer.convert_ids_to_tokens(ids["input_ids"]) == [
        "[CLS]",
        "the",
        "prompt",
        "[SEP]",
        "an",
        "answer",
        "[SEP]",
    ]
    assert ids["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


def test_collator_puts_chosen_rows_first_and_margins_when_present() -> None:
    features = [
        {"chosen": {"input_ids": [1, 2]}, "rejected": {"input_ids": [3]}, "margin": 2.0},
        {"chosen": {"input_ids": [4]}, "rejected": {"input_ids": [5, 6, 7]}},
    ]
    batch = PairCollator(pad_id=0)(features)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [4, 0, 0], [3, 0, 0], [5, 6, 7]]
    assert batch["labels"].tolist() == [0, 0]  # one trained item per pair, for the Trainer's count
    assert batch["margins"].tolist() == [2.0, 0.0]
    assert "margins" not in PairCollator(pad_id=0)([features[1]])


class FirstTokenReward(torch.nn.Module):
    """A stand-in reward model: the reward of a text is ``rewards[first token id]``."""

    def __init__(self, rewards: list[float]) -> None:
        super().__init__()
        self.rewards = torch.nn.Parameter(torch.tensor(rewards), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.rewards[input_ids[:, 0]].unsqueeze(-1))  # (N, 1)


def test_metrics_by_hand() -> None:
    model = FirstTokenReward([0.0, 1.0, 0.0, 2.0, 2.0])  # token id -> reward
    pairs = [(1, 2), (2, 3), (3, 4)]  # rewards 1 vs 0 (right), 0 vs 2 (wrong), 2 vs 2 (tie: half)
    dataset = [
        {"chosen": {"input_ids": [c, 9][: 1 + k % 2]}, "rejected": {"input_ids": [r]}} for k, (c, r) in enumerate(pairs)
    ]
    m = evaluate(model, dataset, "validation", collator=PairCollator(pad_id=0), batch_size=2)
    assert m["validation/pairwise_accuracy"] == pytest.approx(0.5)
    assert m["validation/reward_margin"] == pytest.approx(-1 / 3)
    assert m["validation/reward_chosen"] == pytest.approx(1.0)
    assert m["validation/reward_rejected"] == pytest.approx(4 / 3)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2)) + math.log(2)) / 3  # -log sigmoid(r_c - r_r)
    assert m["validation/loss"] == pytest.approx(expected)


def test_forward_splits_one_batch_into_chosen_and_rejected() -> None:
    batch = PairCollator(pad_id=0)([{"chosen": {"input_ids": [3]}, "rejected": {"input_ids": [1]}, "margin": 0.5}])
    inputs = forward(FirstTokenReward([0.0, 1.0, 0.0, 2.0]), batch)
    assert inputs.rewards_chosen.tolist() == [2.0]
    assert inputs.rewards_rejected.tolist() == [1.0]
    assert inputs.margins.tolist() == [0.5]


def test_classification_losses_are_refused() -> None:
    config = TrainConfig(
        task="reward_model", output_dir="unused", data={"train": "unused"}, loss={"terms": [{"name": "cross_entropy"}]}
    )
    with pytest.raises(UserError, match="cross_entropy.*needs.*class_logits"):
        plan_loss(config)
