"""Token-level loss and perplexity, streamed exactly over batches and processes.

State: ``sum_nll`` (the summed negative log-likelihood of every scored token, in nats) and
``n_tokens``. ``loss = sum_nll / n_tokens``, ``perplexity = exp(loss)``: the per-token mean
over the whole evaluation set, not a mean of batch means (which over-weights short batches).
"""

from __future__ import annotations

import math

import torch

from losslab.eval._state import SumState
from losslab.labels import IGNORE_INDEX

_CHUNK_ELEMENTS = 1 << 26
"""Logits converted to float64 at a time by :func:`token_nll_sum` (512 MiB)."""


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> tuple[float, int]:
    """``(sum_nll, n_tokens)`` of one batch, the input of :meth:`PerplexityAccumulator.update`.

    ``logits`` (..., V), ``labels`` (...) already aligned with them (for next-token prediction
    shift first: ``logits[:, :-1]`` with ``labels[:, 1:]``). ``sum_nll = sum over tokens with
    label != ignore_index of -log softmax(logits)[label]`` (float64), ``n_tokens`` = their
    number.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} (+ vocab)")
    positions = (labels != ignore_index).nonzero()  # (n, labels.ndim) indices of scored tokens
    if positions.shape[0] == 0:
        return 0.0, 0
    # float64 rows a chunk at a time: a float64 copy of all (n, V) logits at once would be
    # twice the size of the float32 logits (tens of GB for a 150k vocabulary).
    chunk = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for idx in positions.split(chunk):
        where = tuple(idx.T)
        block = logits[where].double()  # (c, V)
        target = block.gather(-1, labels[where].unsqueeze(-1)).squeeze(-1)  # (c,)
        total += (torch.logsumexp(block, dim=-1) - target).sum()
    return float(total), int(positions.shape[0])


def perplexity(sum_nll: float, n_tokens: int | float) -> float:
    """``exp(sum_nll / n_tokens)``; ``inf`` when it overflows a float; ``n_tokens <= 0`` raises."""
    if n_tokens <= 0:
        raise ValueError("no scored tokens: loss and perplexity are undefined")
    loss = sum_nll / n_tokens
    try:
        return math.exp(loss)  # float64: finite up to loss = log(max float) ~ 709.78
    except OverflowError:
        return math.inf


class PerplexityAccumulator(SumState):
    """Streaming mean token loss and perplexity.

    >>> acc = PerplexityAccumulator()
    >>> acc.update(sum_nll=6.0, n_tokens=3)   # batch 1
    >>> acc.update(sum_nll=2.0, n_tokens=1)   # batch 2: uneven sizes are fine
    >>> acc.compute()["loss"]                 # (6 + 2) / (3 + 1)
    2.0

    Across processes: ``compute(sync=True)`` (the default) all-reduces the two sums when a
    ``torch.distributed`` process group is initialised (every rank must call it); or gather
    the :meth:`state_dict` of each worker and :meth:`merge` them.
    """

    def __init__(self) -> None:
        super().__init__(sum_nll=(), n_tokens=())

    def update(self, sum_nll: float | torch.Tensor, n_tokens: int | torch.Tensor) -> None:
        """Add one batch: the summed NLL (nats) of its scored tokens and their number.

        An all-padding batch is ``(0.0, 0)``; a non-zero ``sum_nll`` over 0 tokens (a loss
        with no tokens behind it, e.g. a batch mean passed with the wrong count) raises
        ``ValueError`` instead of silently inflating the loss of the other batches.
        """
        s = float(sum_nll.detach().double()) if isinstance(sum_nll, torch.Tensor) else float(sum_nll)
        n = float(n_tokens.detach()) if isinstance(n_tokens, torch.Tensor) else float(n_tokens)
        if n < 0 or not math.isfinite(s) or (n == 0 and s != 0.0):
            raise ValueError(f"invalid batch: sum_nll={s}, n_tokens={n}")
        self.state["sum_nll"] += s
        self.state["n_tokens"] += n

    def update_from_logits(
        self, logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
    ) -> None:
        """``update(*token_nll_sum(logits, labels, ignore_index=ignore_index))``."""
        self.update(*token_nll_sum(logits, labels, ignore_index=ignore_index))

    def compute(self, *, sync: bool = True) -> dict[str, float]:
        """``{"loss": sum_nll / n_tokens, "perplexity": exp(loss), "n_tokens": n_tokens}``.

        Raises ``ValueError`` when no token was scored (loss would be 0/0).
        """
        state = self.global_state(sync)
        s, n = float(state["sum_nll"]), float(state["n_tokens"])
        ppl = perplexity(s, n)
        return {"loss": s / n, "perplexity": ppl, "n_tokens": int(n)}
