"""Sum states: the torchmetrics pattern of update (add sums) and compute (divide once).

A metric whose state is a set of sums is exact across batches (add the batch sums) and across
processes (add every process's sums, one ``all_reduce``), whatever the batch sizes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def distributed_world_size() -> int:
    """The number of processes of the default ``torch.distributed`` group; 1 when there is none."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every array of ``state`` summed over the processes of the default group (copies).

    One ``all_reduce`` of a flat float64 tensor (on the current CUDA device for NCCL, on CPU
    otherwise). Without an initialised process group, or with one process, returns copies.
    Every process must call it, with states of the same keys and shapes.
    """
    out = {k: np.array(v, dtype=np.float64, copy=True) for k, v in state.items()}
    if distributed_world_size() <= 1 or not out:
        return out
    import torch
    import torch.distributed as dist

    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.from_numpy(np.concatenate([v.ravel() for v in out.values()])).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat_np = flat.cpu().numpy()
    start = 0
    for k, v in out.items():
        out[k] = flat_np[start : start + v.size].reshape(v.shape).copy()
        start += v.size
    return out


class SumState:
    """Named float64 arrays that only ever get added to; the base of the streaming metrics.

    Subclasses call ``super().__init__(name=shape, ...)``, add to ``self.state[name]`` in
    ``update`` and read :meth:`global_state` in ``compute``.
    """

    def __init__(self, **shapes: tuple[int, ...]) -> None:
        self.state: dict[str, np.ndarray] = {k: np.zeros(s, dtype=np.float64) for k, s in shapes.items()}

    def reset(self) -> None:
        """Zero every sum (start a new evaluation)."""
        for v in self.state.values():
            v.fill(0.0)

    def merge(self, other: SumState) -> None:
        """Add ``other``'s sums into this one (e.g. states gathered from other workers)."""
        if type(other) is not type(self) or other.state.keys() != self.state.keys():
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for k, v in self.state.items():
            if other.state[k].shape != v.shape:
                raise ValueError(f"cannot merge: {k!r} has shape {other.state[k].shape}, expected {v.shape}")
            v += other.state[k]

    def state_dict(self) -> dict[str, list[float] | float]:
        """The sums as JSON-friendly Python floats (lists for arrays)."""
        return {k: v.tolist() for k, v in self.state.items()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Replace the sums with those of :meth:`state_dict` (same keys and shapes)."""
        if set(state) != set(self.state):
            raise ValueError(f"state keys {sorted(state)} != expected {sorted(self.state)}")
        for k, v in self.state.items():
            new = np.asarray(state[k], dtype=np.float64)
            if new.shape != v.shape:
                raise ValueError(f"state {k!r} has shape {new.shape}, expected {v.shape}")
            v[...] = new

    def global_state(self, sync: bool = True) -> dict[str, np.ndarray]:
        """The sums over all processes when ``sync`` and a process group is initialised, else a
        copy of this process's sums. The local state is never modified, so calling it twice
        does not double-count."""
        if sync:
            return all_reduce_sum(self.state)
        return {k: v.copy() for k, v in self.state.items()}
