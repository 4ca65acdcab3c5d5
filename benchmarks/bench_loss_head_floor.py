"""How close is the fused head to the three matmuls that any exact loss head must do?

    .venv/bin/python benchmarks/bench_loss_head_floor.py                 # N=4096 d=576 V=49152
    .venv/bin/python benchmarks/bench_loss_head_floor.py --vocab 151936

Forward + backward of a cross-entropy LM head needs ``z = h W^T``, ``dh = P W`` and
``dW = P^T h`` (2 N d V flops each). This times, interleaved in one process (so contention hits
all alike): those three matmuls alone at full size (no softmax, no loss: a lower bound for any
exact method in float32), losslab's fused head, and the plain ``F.cross_entropy(h @ W.T)``.
Reports the minimum of ``--repeats`` runs and the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from losslab.losses.fused import fused_linear_cross_entropy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, generator=gen).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5).requires_grad_()
    y = torch.randint(0, args.vocab, (args.tokens,), generator=gen)

    def matmuls() -> None:
        with torch.no_grad():
            z = h @ w.T
            _ = z @ w, z.T @ h

    def fused() -> None:
        fused_linear_cross_entropy(h, w, y).backward()

    def plain() -> None:
        F.cross_entropy(h @ w.T, y).backward()

    cases = {"three matmuls": matmuls, "losslab fused": fused, "plain": plain}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            h.grad = w.grad = None
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    print(
        f"N={args.tokens} d={args.hidden} V={args.vocab} float32, {torch.get_num_threads()} threads, "
        f"min of {args.repeats}"
    )
    for name, t in best.items():
        print(f"  {name:14s} {t:6.2f} s   {t / best['plain']:.2f}x plain   {t / best['three matmuls']:.2f}x matmuls")


if __name__ == "__main__":
    main()
