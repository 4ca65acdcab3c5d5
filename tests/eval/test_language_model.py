"""Streaming token loss / perplexity: by hand, against F.cross_entropy, across batches and ranks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from losslab.eval.language_model import PerplexityAccumulator, perplexity, token_nll_sum


def test_by_hand():
    acc = PerplexityAccumulator()
    acc.update(sum_nll=6.0, n_tokens=3)
    acc.update(sum_nll=torch.tensor(2.0), n_tokens=torch.tensor(1))
    out = acc.compute()
    assert out == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0)), "n_tokens": 4}
    # uniform over a vocabulary of 8: NLL log 8 per token, perplexity exactly 8
    s, n = token_nll_sum(torch.zeros(2, 5, 8), torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 0]]))
    assert n == 8 and s == pytest.approx(8 * math.log(8))
    assert perplexity(s, n) == pytest.approx(8.0)


def _ragged_batch(gen: torch.Generator, lengths: list[int], vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T, V) logits and (B, T) labels, -100 on the padding."""
    t = max(lengths)
    logits = torch.randn(len(lengths), t, vocab, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (len(lengths), t), generator=gen)
    for i, n in enumerate(lengths):
        labels[i, n:] = -100
    return logits, labels


def test_uneven_batches_equal_one_shot():
    gen = torch.Generator().manual_seed(0)
    batches = [_ragged_batch(gen, lens) for lens in ([9, 2, 5], [1], [12, 3], [4, 4, 4, 1])]
    acc = PerplexityAccumulator()
    for logits, labels in batches:
        acc.update_from_logits(logits, labels)
    flat_logits = torch.cat([lg[lb != -100] for lg, lb in batches])
    flat_labels = torch.cat([lb[lb != -100] for _, lb in batches])
    one_shot = F.cross_entropy(flat_logits, flat_labels).item()
    out = acc.compute()
    assert out["n_tokens"] == len(flat_labels) == 45
    assert out["loss"] == pytest.approx(one_shot, rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(one_shot), rel=1e-12)
    # the mean of batch means is a different (wrong) number on these uneven batches
    batch_means = [F.cross_entropy(lg.flatten(0, 1), lb.flatten(), ignore_index=-100).item() for lg, lb in batches]
    assert abs(sum(batch_means) / len(batch_means) - one_shot) > 1e-3


def test_token_nll_sum_matches_cross_entropy_in_float32_and_bf16():
    gen = torch.Generator().manual_seed(1)
    logits, labels = _ragged_batch(gen, [6, 3])
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
    assert token_nll_sum(logits.float(), labels)[0] == pytest.approx(ref, rel=1e-6)
    # bfloat16 logits are scored in float64 as given (not in bfloat16, which is off by ~3e-3)
    ref_bf16 = F.cross_entropy(logits.bfloat16().double().flatten(0, 1), labels.flatten(), reduction="sum").item()
    assert token_nll_sum(logits.bfloat16(), labels)[0] == pytest.approx(ref_bf16, rel=1e-12)
    assert token_nll_sum(logits, torch.full_like(labels, -100)) == (0.0, 0)
    with pytest.raises(ValueError, match="do not match"):
        token_nll_sum(logits, labels[:, :-1])


def test_merge_state_dict_and_empty():
    a, b = PerplexityAccumulator(), PerplexityAccumulator()
    a.update(3.0, 2)
    b.update(1.0, 2)
    restored = PerplexityAccumulator()
    restored.load_state_dict(json.loads(json.dumps(b.state_dict())))
    a.merge(restored)
    assert a.compute()["loss"] == 1.0
    assert a.compute()["loss"] == 1.0  # compute does not change the state
    empty = PerplexityAccumulator()
    with pytest.raises(ValueError, match="no scored tokens"):
        empty.compute()
    empty.update(0.0, 0)  # an all-padding batch is fine
    with pytest.raises(ValueError, match="no scored tokens"):
        empty.compute()
    with pytest.raises(ValueError, match="invalid batch"):
        empty.update(float("nan"), 3)
    assert perplexity(1e6, 1) == math.inf


_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from losslab.eval.language_model import PerplexityAccumulator
    from losslab.eval.classification import ClassificationAccumulator

    rank, init = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    ppl = PerplexityAccumulator()
    cls = ClassificationAccumulator(3)
    if rank == 0:
        ppl.update(6.0, 3); cls.update([0, 1, 2], [0, 1, 1])
    else:
        ppl.update(2.0, 1); ppl.update(4.0, 4); cls.update([2, 2], [2, 0])
    out = {"ppl": ppl.compute(), "local": ppl.compute(sync=False),
           "acc": cls.compute().to_dict()["accuracy"]}
    dist.destroy_process_group()
    print(json.dumps(out))
    """
)


def test_two_processes_all_reduce(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    init = f"file://{tmp_path / 'store'}"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), init], stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outs:
        assert out["ppl"]["loss"] == pytest.approx(12.0 / 8)  # (6 + 2 + 4) / (3 + 1 + 4)
        assert out["ppl"]["n_tokens"] == 8
        assert out["acc"] == pytest.approx(3 / 5)
    assert outs[0]["local"]["loss"] == pytest.approx(2.0)
    assert outs[1]["local"]["loss"] == pytest.approx(6.0 / 5)


def test_perplexity_is_finite_up_to_the_float64_limit():
    # exp(709.5) = 1.35e308 is a finite float64; only a loss above log(max float) ~ 709.78 is inf
    assert perplexity(709.5, 1) == pytest.approx(math.exp(709.5))
    assert math.isfinite(perplexity(2 * 709.7, 2))
    assert perplexity(709.8, 1) == math.inf
    acc = PerplexityAccumulator()
    acc.update(torch.tensor(7095.0, dtype=torch.float32), torch.tensor(10))
    assert acc.compute()["perplexity"] == pytest.approx(math.exp(709.5))


def test_update_refuses_a_loss_without_tokens():
    # (0.0, 0) is an all-padding batch; a non-zero NLL over no tokens would inflate the loss
    acc = PerplexityAccumulator()
    acc.update(0.0, 0)
    with pytest.raises(ValueError, match="invalid batch"):
        acc.update(3.0, 0)
    acc.update(1.0, 1)
    assert acc.compute()["loss"] == 1.0


def test_token_nll_sum_in_chunks_equals_one_shot(monkeypatch):
    # float64 conversion runs over chunks of rows (bounded memory); the sum must not change
    import losslab.eval.language_model as lm

    gen = torch.Generator().manual_seed(2)
    logits, labels = _ragged_batch(gen, [7, 2, 5])
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
    for elements in (1, 11 * 3, 1 << 26):  # one row, 3 rows, everything per chunk
        monkeypatch.setattr(lm, "_CHUNK_ELEMENTS", elements, raising=False)
        s, n = token_nll_sum(logits[:, :-1], labels[:, 1:])  # a non-contiguous view, as shifted
        ref_shifted = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum").item()
        assert n == int((labels[:, 1:] != -100).sum())
        assert s == pytest.approx(ref_shifted, rel=1e-12)
    assert token_nll_sum(logits, labels)[0] == pytest.approx(ref, rel=1e-12)
