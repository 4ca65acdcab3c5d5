"""``gather_across_devices`` and InfoNCE across processes: two real processes (gloo) holding 3
and 2 of 5 rows give, summed over the processes, the loss and the gradients (float64) of one
process holding all 5 (repeated texts across the processes included); without the gather the loss is weaker; a gather that keeps the gradient
of the local rows only (the remote rows detached) gets the loss right but not the gradients."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from losslab.losses.gather import gather_across_devices, process_group_size
from losslab.losses.pairwise import info_nce_loss

SPLIT = (3, 2)  # rows of process 0 and process 1: uneven on purpose
CASES = {  # name -> info_nce options
    "plain": {},
    "negatives": {"negatives": True},
    "symmetric_negatives": {"negatives": True, "symmetric": True},
    "masked_weighted": {"mask": True, "weights": True, "symmetric": True},
    "sum": {"negatives": True, "reduction": "sum"},
    # a reply text on both processes (rows 0 and 4) and a reply that is the other process's
    # explicit negative (row 3, negative 2): left out of the queries' negatives across processes
    "text_ids": {"negatives": True, "symmetric": True, "ids": True},
}
KEY_IDS = [7, 1, 2, 3, 7]
NEGATIVE_IDS = [9, 9, 3, 8, 6]

_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from losslab.losses.gather import gather_across_devices
    from losslab.losses.pairwise import info_nce_loss

    rank, init, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    data = torch.load(f"{folder}/inputs.pt")
    start, rows = (0, 3) if rank == 0 else (3, 2)
    mine = slice(start, start + rows)
    out = {}

    # the gathering function: values, start, and the gradient of a loss on every process
    x = data["x"][mine].clone().requires_grad_(True)
    gathered, begin = gather_across_devices(x)
    (gathered * data["w"][rank]).sum().backward()
    out["gather"] = {"values": gathered.detach(), "start": begin, "grad": x.grad}

    def detached_gather(t):  # the local rows keep their gradient, the other rows come detached
        parts = [torch.zeros((3, t.shape[1]), dtype=t.dtype) for _ in range(2)]
        padded = torch.zeros((3, t.shape[1]), dtype=t.dtype)
        padded[:rows] = t.detach()
        dist.all_gather(parts, padded)
        parts = [parts[0][:3], parts[1][:2]]
        parts[rank] = t
        return torch.cat(parts)

    for name, opts in data["cases"].items():
        for mode in ("gather", "local", "detached"):
            leaves = {k: data[k][mine].clone().requires_grad_(True) for k in ("q", "k", "n")}
            kwargs = {"temperature": 0.1, "symmetric": opts.get("symmetric", False),
                      "reduction": opts.get("reduction", "mean"), "gather_across_devices": mode == "gather"}
            if opts.get("negatives"):
                kwargs["negatives"] = leaves["n"]
            if opts.get("mask"):
                kwargs["mask"] = data["mask"][mine]
            if opts.get("weights"):
                kwargs["weights"] = data["weights"][mine]
            if opts.get("ids") and mode != "detached":
                kwargs["key_ids"] = data["key_ids"][mine]
                kwargs["negative_ids"] = data["negative_ids"][mine]
            if kwargs["reduction"] == "mean":
                kwargs["num_items"] = int(data["mask"].sum()) if opts.get("mask") else 5
            keys = leaves["k"]
            if mode == "detached":  # the other process's keys as extra negatives, detached
                every = detached_gather(leaves["k"])
                others = torch.cat([every[:start], every[start + rows:]])
                if opts.get("mask"):
                    valid = data["mask"].clone()
                    others = others[torch.cat([valid[:start], valid[start + rows:]])]
                extra = [others] + ([detached_gather(leaves["n"])] if opts.get("negatives") else [])
                kwargs["negatives"] = torch.cat(extra)
                kwargs["gather_across_devices"] = False
            loss = info_nce_loss(leaves["q"], keys, **kwargs)
            loss.backward()
            out[f"{name}/{mode}"] = {"loss": loss.detach(), **{k: v.grad for k, v in leaves.items()}}
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()
    """
)


def reference(data: dict, opts: dict) -> dict[str, torch.Tensor]:
    """One process holding all 5 rows."""
    leaves = {k: data[k].clone().requires_grad_(True) for k in ("q", "k", "n")}
    kwargs: dict = {"temperature": 0.1, "symmetric": opts.get("symmetric", False)}
    kwargs["reduction"] = opts.get("reduction", "mean")
    if opts.get("negatives"):
        kwargs["negatives"] = leaves["n"]
    if opts.get("mask"):
        kwargs["mask"] = data["mask"]
    if opts.get("weights"):
        kwargs["weights"] = data["weights"]
    if opts.get("ids"):
        kwargs["key_ids"], kwargs["negative_ids"] = data["key_ids"], data["negative_ids"]
    loss = info_nce_loss(leaves["q"], leaves["k"], **kwargs)
    loss.backward()
    return {
        "loss": loss.detach(),
        **{k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()},
    }


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    folder = tmp_path_factory.mktemp("gather")
    generator = torch.Generator().manual_seed(0)
    data = {k: torch.randn(5, 4, generator=generator, dtype=torch.float64) for k in ("q", "k", "n", "x")}
    data["w"] = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64)
    data["mask"] = torch.tensor([True, False, True, True, True])  # a masked row on process 0
    data["weights"] = torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    data["key_ids"], data["negative_ids"] = torch.tensor(KEY_IDS), torch.tensor(NEGATIVE_IDS)
    data["k"][4], data["n"][2] = data["k"][0], data["k"][3]  # the same text, the same vector
    data["cases"] = CASES
    torch.save(data, folder / "inputs.pt")
    script = folder / "worker.py"
    script.write_text(_WORKER)
    init = f"file://{folder / 'store'}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), init, str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    return data, [torch.load(folder / f"rank{r}.pt") for r in range(2)]


def test_gather_gives_every_row_and_sums_the_gradient(two_processes) -> None:
    data, ranks = two_processes
    for rank, out in enumerate(ranks):
        torch.testing.assert_close(out["gather"]["values"], data["x"], rtol=0, atol=0)
        assert out["gather"]["start"] == (0, 3)[rank]
    # d/dx_p of sum_r <w_r, gather(x)> = sum_r w_r[rows of p]
    total = data["w"].sum(dim=0)
    torch.testing.assert_close(ranks[0]["gather"]["grad"], total[:3], rtol=0, atol=1e-15)
    torch.testing.assert_close(ranks[1]["gather"]["grad"], total[3:], rtol=0, atol=1e-15)


@pytest.mark.parametrize("case", CASES)
def test_two_processes_give_the_loss_and_gradients_of_one(two_processes, case: str) -> None:
    data, ranks = two_processes
    expected = reference(data, CASES[case])
    parts = [out[f"{case}/gather"] for out in ranks]
    torch.testing.assert_close(parts[0]["loss"] + parts[1]["loss"], expected["loss"], rtol=1e-12, atol=1e-12)
    for name in ("q", "k"):
        torch.testing.assert_close(torch.cat([p[name] for p in parts]), expected[name], rtol=1e-10, atol=1e-12)
    if CASES[case].get("negatives"):
        torch.testing.assert_close(torch.cat([p["n"] for p in parts]), expected["n"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_without_the_gather_each_process_sees_fewer_negatives(two_processes, case: str) -> None:
    data, ranks = two_processes
    expected = reference(data, CASES[case])
    local = ranks[0][f"{case}/local"]["loss"] + ranks[1][f"{case}/local"]["loss"]
    assert float(local) < float(expected["loss"]) - 1e-3  # fewer negatives per query: a weaker loss


@pytest.mark.parametrize("case", ["plain", "negatives"])
def test_detached_remote_rows_get_the_loss_but_not_the_gradients(two_processes, case: str) -> None:
    """The other processes' rows as detached negatives (each process's own rows keep their
    gradient): the loss is right, the keys' gradients miss what the other process's queries
    send them, so the gather must send gradients back."""
    data, ranks = two_processes
    expected = reference(data, CASES[case])
    parts = [out[f"{case}/detached"] for out in ranks]
    torch.testing.assert_close(parts[0]["loss"] + parts[1]["loss"], expected["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([p["q"] for p in parts]), expected["q"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(torch.cat([p["k"] for p in parts]), expected["k"], rtol=1e-3, atol=1e-6)


def test_text_ids_matter_across_the_processes(two_processes) -> None:
    """The ``text_ids`` case (whose two-process loss equals one process's above) differs from the
    same inputs without ids: the repeated texts straddle the processes."""
    data, _ = two_processes
    without = {k: v for k, v in CASES["text_ids"].items() if k != "ids"}
    assert float(reference(data, CASES["text_ids"])["loss"]) < float(reference(data, without)["loss"]) - 1e-3


def test_one_process_is_the_identity() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert process_group_size() == 1
    out, start = gather_across_devices(x)
    assert out is x and start == 0
    q, k = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert float(info_nce_loss(q, k)) == float(info_nce_loss(q, k, gather_across_devices=False))
