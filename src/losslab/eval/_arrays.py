"""Input conversion shared by the metrics: numpy arrays, torch tensors or lists in, numpy out."""

from __future__ import annotations

from typing import Any

import numpy as np

ArrayLike = Any
"""Anything :func:`numpy.asarray` accepts, or a torch tensor (detached and moved to CPU)."""


def as_numpy(x: ArrayLike, name: str, *, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``x`` as a numpy array; torch tensors are detached, moved to CPU, bf16/fp16 made float32.

    Raises ``ValueError`` naming ``name`` when the number of dimensions is not ``ndim``.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if arr.ndim not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name} must have {want} dimension(s); got shape {arr.shape}")
    return arr


def as_float_array(x: ArrayLike, name: str, *, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``x`` as float64, refusing NaN and infinities (a metric of a NaN is a silent bug)."""
    arr = as_numpy(x, name, ndim=ndim).astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same first dimension and it is > 0."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} differ in length: {len(a)} != {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{name_a} and {name_b} are empty: nothing to evaluate")


def safe_divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    """``num / den`` element-wise (float64), ``zero_division`` where ``den == 0``, no warnings."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, float(zero_division), dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out
