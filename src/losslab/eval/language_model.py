"""Token-level loss and perplexity, streamed exactly over batches and processes.

State: ``sum_nll`` (the summed negative log-likelihood of every scored token, in nats) and
``n_tokens``. ``loss = sum_nll / n_tokens``, ``perplexity = exp(loss)``: the per-token mean
over the whole evaluation set, not a mean of batch means (which over-weights short batches).
"""

from __future__ import annotations

import math

import torch

from losslab.eval._state import SumState


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> tuple[float, int]:
    """``(sum_nll, n_tokens)`` of one batch, the input of :meth:`PerplexityAccumulator.update`.

    ``logits`` (..., V), ``labels`` (...) already aligned with them (for next-token prediction
    shift first: ``logits[:, :-1]`` with ``labels[:, 1:]``). ``sum_nll = sum over tokens with
    label != ignore_index of -log softmax(logits)[label]`` (float64), ``n_tokens`` = their
    number.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} (+ vocab)")
    keep = labels != ignore_index
    if not bool(keep.any()):
        return 0.0, 0
    rows = logits[keep].double()  # (n, V)
    nll = torch.logsumexp(rows, dim=-1) - rows.gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
    return float(nll.sum()), int(keep.sum())


def perplexity(sum_nll: float, n_tokens: int | float) -> float:
    """``exp(sum_nll / n_tokens)``; ``inf`` when it overflows a float; ``n_tokens <= 0`` raises."""
    if n_tokens <= 0:
        raise ValueError("no scored tokens: loss and perplexity are undefined")
    loss = sum_nll / n_tokens
    return math.exp(loss) if loss < 709.0 else math.inf


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
        """Add one batch: the summed NLL (nats) of its scored tokens and their number."""
        s = float(sum_nll.detach().double()) if isinstance(sum_nll, torch.Tensor) else float(sum_nll)
        n = float(n_tokens.detach()) if isinstance(n_tokens, torch.Tensor) else float(n_tokens)
        if n < 0 or not math.isfinite(s):
            raise ValueError(f"invalid batch: sum_nll={s}, n_tokens={n}")
        self.state["sum_nll"] += s
        self.state["n_tokens"] += n

    def update_from_logits(self, logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> None:
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
