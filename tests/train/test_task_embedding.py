"""embedding: context -> reply pairs, explicit negatives, pooling, retrieval metrics by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from losslab.data.schemas import Message
from losslab.errors import UserError
from losslab.train.config import EmbeddingConfig
from losslab.train.tasks.embedding import (
    TripleCollator,
    conversation_pairs,
    evaluate,
    negative_replies,
    pool_states,
    round_robin,
)

CHAT = [
    Message(role="system", content="S"),
    Message(role="user", content="u1"),
    Message(role="assistant", content="a1"),
    Message(role="user", content="u2"),
    Message(role="assistant", content="a2"),
]


def test_pairs_from_a_conversation() -> None:
    assert [(p.context, p.reply) for p in conversation_pairs(CHAT, 0, context_turns=1)] == [("u1", "a1"), ("u2", "a2")]
    assert [(p.context, p.reply) for p in conversation_pairs(CHAT, 0, context_turns=2)] == [
        ("u1", "a1"),
        ("a1\nu2", "a2"),
    ]
    assert [p.context for p in conversation_pairs(CHAT, 0, context_turns=0)] == ["u1", "u1\na1\nu2"]  # system left out


def test_round_robin_spreads_the_first_pairs_over_conversations() -> None:
    groups = [conversation_pairs(CHAT, c, 1) for c in range(3)]
    assert [(p.conversation, p.reply) for p in round_robin(groups)[:4]] == [(0, "a1"), (1, "a1"), (2, "a1"), (0, "a2")]


def test_negatives_come_from_other_conversations_and_a_fixed_seed() -> None:
    pool = [
        p
        for c in range(4)
        for p in conversation_pairs(
            [*CHAT[:3], Message(role="user", content=f"x{c}"), Message(role="assistant", content=f"r{c}")], c, 1
        )
    ]
    first = negative_replies(pool, pool, seed=0)
    assert first == negative_replies(pool, pool, seed=0)
    by_reply = {p.reply: p.conversation for p in pool if p.reply.startswith("r")}
    for pair, negative in zip(pool, first):
        assert by_reply.get(negative) != pair.conversation
    with pytest.raises(UserError, match="2 conversations"):
        negative_replies(pool[:2], pool[:2], seed=0)


def test_pooling_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]], [[0.0, 4.0], [9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert pool_states(hidden, mask, "mean", False).tolist() == [[2.0, 1.0], [0.0, 4.0]]
    assert pool_states(hidden, mask, "cls", False).tolist() == [[1.0, 0.0], [0.0, 4.0]]
    assert pool_states(hidden, mask, "last", False).tolist() == [[3.0, 2.0], [0.0, 4.0]]
    assert torch.linalg.vector_norm(pool_states(hidden, mask, "mean", True), dim=-1).tolist() == pytest.approx(
        [1.0, 1.0]
    )


def test_collator_rows_are_contexts_replies_negatives() -> None:
    features = [
        {"anchor": {"input_ids": [1]}, "positive": {"input_ids": [2]}, "negative": {"input_ids": [3]}},
        {"anchor": {"input_ids": [4]}, "positive": {"input_ids": [5]}, "negative": {"input_ids": [6]}},
    ]
    assert TripleCollator(0, negatives=True)(features)["input_ids"].flatten().tolist() == [1, 4, 2, 5, 3, 6]
    batch = TripleCollator(0, negatives=False)(features)
    assert batch["input_ids"].flatten().tolist() == [1, 4, 2, 5]
    assert batch["labels"].tolist() == [0, 0] and batch["return_loss"] is True


class TokenVectors(torch.nn.Module):
    """A stand-in encoder: the state of a token is ``table[token id]``."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.table[input_ids])


def test_retrieval_metrics_by_hand() -> None:
    # ids: 0 = padding (a wild vector: must not count), 1 = [1, 0], 2 = [0, 1], 3 = [1, 0.1]
    model = TokenVectors([[-50.0, 80.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    dataset = [
        {"anchor": {"input_ids": [1]}, "positive": {"input_ids": [3]}},  # best candidate [1, 0]: its reply ranks 2
        {"anchor": {"input_ids": [2]}, "positive": {"input_ids": [1]}},  # [0, 1]: cos 0 vs 0.0995: rank 2
        {"anchor": {"input_ids": [1, 2]}, "positive": {"input_ids": [3]}},  # mean [0.5, 0.5]; the same reply as row 0
    ]
    options = EmbeddingConfig(recall_at=[1, 2])
    m = evaluate(model, dataset, "test", pad_id=0, batch_size=2, options=options)
    assert m["test/candidates"] == 2  # identical replies are one candidate
    assert m["test/recall@1"] == pytest.approx(1 / 3)
    assert m["test/recall@2"] == pytest.approx(1.0)
    assert m["test/mrr"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_a_repeated_reply_is_not_its_own_negative(tmp_path) -> None:
    """Two contexts answered by the same text ("Hello!") in one batch: with in-batch negatives
    each would have its own reply as a negative, a loss that cannot go below log 2. Both train,
    each without the other's copy of its reply among its negatives: the loss equals a
    hand-built InfoNCE whose rows 0 and 2 leave out column 2 and 0, and differs from the
    loss with the false negatives in."""
    import json

    from losslab.losses.pairwise import info_nce_loss
    from losslab.train.config import TrainConfig
    from losslab.train.run import loss_adapter
    from losslab.train.task import plan_loss
    from losslab.train.tasks.embedding import build, embed

    chats = [("hi there", "Hello!"), ("how is the weather", "Sunny and warm today."), ("good morning", "Hello!")]
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}) + "\n"
            for u, a in chats
        )
    )
    config = TrainConfig(
        task="embedding",
        model="builtin:tiny-llama",
        output_dir=str(tmp_path / "run"),
        data={"train": str(data), "max_length": 16},
    )
    plan = plan_loss(config)
    run = build(config, plan)
    batch = run.collator(run.train)
    assert batch["labels"].tolist() == [0, 0, 0]
    ids = batch["positive_ids"].tolist()
    assert ids[0] == ids[2] != ids[1]
    run.model.eval()
    loss_func = loss_adapter(run, plan)
    with torch.no_grad():
        loss = loss_func.compute_loss(run.model, batch)
        vectors = embed(run.model, batch, EmbeddingConfig())  # (6, D): 3 contexts, 3 replies
    q = torch.nn.functional.normalize(vectors[:3].double(), dim=-1)
    k = torch.nn.functional.normalize(vectors[3:].double(), dim=-1)
    scores = q @ k.T / 0.05
    scores[0, 2] = scores[2, 0] = -float("inf")  # each one's copy of "Hello!" is not its negative
    expected = torch.nn.functional.cross_entropy(scores, torch.arange(3))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    with_false_negatives = info_nce_loss(vectors[:3], vectors[3:], temperature=0.05)
    assert float(loss) < float(with_false_negatives) - 1e-3


def test_collator_gives_text_ids_of_replies_and_negatives() -> None:
    features = [
        {"anchor": {"input_ids": [1]}, "positive": {"input_ids": [2]}, "negative": {"input_ids": [5]}},
        {"anchor": {"input_ids": [3]}, "positive": {"input_ids": [5]}, "negative": {"input_ids": [7]}},
        {"anchor": {"input_ids": [4]}, "positive": {"input_ids": [2]}, "negative": {"input_ids": [8]}},
    ]
    batch = TripleCollator(0, negatives=True, in_batch=True)(features)
    assert batch["labels"].tolist() == [0, 0, 0]  # every pair trains
    pos, neg = batch["positive_ids"].tolist(), batch["negative_ids"].tolist()
    # row 2's reply repeats row 0's; row 1's reply is row 0's negative
    assert pos[0] == pos[2] and pos[1] == neg[0] and len({pos[0], pos[1], neg[1], neg[2]}) == 4
    assert all(0 <= i < 2**63 for i in pos + neg)
    # triplet alone has no in-batch negatives: no ids
    assert "positive_ids" not in TripleCollator(0, negatives=True)(features)


def test_the_log_says_where_in_batch_negatives_come_from(tmp_path) -> None:
    from losslab.train.config import TrainConfig
    from losslab.train.task import plan_loss
    from losslab.train.tasks.embedding import in_batch_negatives

    from ..conftest import train_config

    def plan(*terms: dict):
        return plan_loss(TrainConfig(**train_config(tmp_path, task="embedding", loss={"terms": list(terms)})))

    gathered, local = {"name": "info_nce"}, {"name": "info_nce", "gather_across_devices": False, "label": "own"}
    assert in_batch_negatives(plan(gathered), processes=1) == "the batch"
    assert in_batch_negatives(plan(gathered), processes=4) == "the batches of all 4 processes (gather_across_devices)"
    assert in_batch_negatives(plan(local), processes=2) == "each process's own batch (gather_across_devices: false)"
    assert "by term" in str(in_batch_negatives(plan(gathered, local), processes=2))
    assert in_batch_negatives(plan({"name": "triplet"}), processes=2) is None  # no in-batch negatives
