"""The reference model's log-probs: the fingerprint, the sharded on-disk cache (hits, resume after
a kill, corrupt shards, several processes, torch.distributed ranks) and the frozen on-the-fly copy,
bit-equal to the cache on the same batches (tiny-llama)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from losslab.train import reference
from losslab.train.reference import cached_logps, frozen_reference, read_manifest, reference_fingerprint

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def pairs(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [
        {k: [rng.randrange(49152) for _ in range(rng.randint(1, 6))] for k in ("prompt", "chosen", "rejected")}
        for _ in range(n)
    ]


def fake_values(batch: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """(len(batch), 2) float32 values with arbitrary low bits, a function of each item alone."""
    rows = [
        [torch.tensor(item["prompt"] + item[key], dtype=torch.float32).sin().sum() for key in ("chosen", "rejected")]
        for item in batch
    ]
    return torch.tensor(rows, dtype=torch.float32) * -3.7


class Compute:
    """A fake reference: counts its calls, records the items of each batch, and raises (a kill)
    once ``fail_after`` batches are done."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.batches: list[list[Mapping[str, Any]]] = []
        self.fail_after = fail_after

    def __call__(self, batch: list[Mapping[str, Any]]) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        assert not torch.is_grad_enabled()
        self.calls += 1
        self.batches.append(batch)
        return fake_values(batch)


def direct(items: Sequence[Mapping[str, Any]], batch_size: int) -> torch.Tensor:
    """The values computed on the fly over the same batches."""
    return torch.cat([fake_values(items[a : a + batch_size]) for a in range(0, len(items), batch_size)])


FP = "0123456789abcdef" * 2


def run(items: Sequence[Mapping[str, Any]], compute: Any, root: Path, **kw: Any) -> torch.Tensor:
    kw = {"fingerprint": FP, "batch_size": 4, "shard_items": 8, "progress": False, **kw}
    return cached_logps(items, compute, columns=COLUMNS, cache_root=root, **kw)


# ---- the fingerprint ------------------------------------------------------------------------------


def model_dir(path: Path, weight: float = 1.0, config: str = "{}") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((3,), weight)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(config)
    (path / "tokenizer_config.json").write_text("{}")
    return path


def test_fingerprint_is_stable_and_changes_with_every_input(tmp_path: Path) -> None:
    items = pairs(5)
    model = str(model_dir(tmp_path / "m"))

    def fp(model: str = model, items: Sequence[Mapping[str, Any]] = items, **kw: Any) -> str:
        kw.setdefault("extra", {"dtype": "float32"})
        return reference_fingerprint(model, items, cache_root=tmp_path / "cache", **kw)

    base = fp()
    assert len(base) == 32 and base == fp() and base == fp(items=[dict(i) for i in items])
    changed = [dict(i) for i in items]
    changed[3] = {**changed[3], "rejected": changed[3]["rejected"][:-1] + [changed[3]["rejected"][-1] + 1]}
    variants = {
        "a token": fp(items=changed),
        "the order": fp(items=items[::-1]),
        "an item fewer": fp(items=items[:-1]),
        "a field more": fp(items=[{**i, "desirable": True} for i in items]),
        "fields": fp(fields=("prompt", "chosen")),
        "tensor ids": fp(items=[{k: torch.tensor(v) for k, v in i.items()} for i in items]),
        "extra": fp(extra={"dtype": "bfloat16"}),
        "code": fp(code=("losslab.files",)),
        "other weights": fp(model=str(model_dir(tmp_path / "m2", weight=2.0))),
        "other config": fp(model=str(model_dir(tmp_path / "m3", config='{"a": 1}'))),
        "a hub id": fp(model="some-org/some-model"),
        "a hub revision": fp(model="some-org/some-model", revision="v2"),
        "builtin": fp(model="builtin:tiny-llama"),
    }
    assert len({base, *variants.values()}) == 1 + len(variants), variants
    # the same weights in another folder are the same model; tokenizer files do not count (items are ids)
    same = model_dir(tmp_path / "copy")
    (same / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    assert fp(model=str(same)) == base
    # rewriting the weights in place is seen (size and mtime key the remembered hash)
    model_dir(tmp_path / "m", weight=5.0)
    assert fp() != base
    with pytest.raises(ValueError, match="item 0 has no field 'completion'"):
        fp(fields=("completion",))


def test_model_file_hashes_are_remembered_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = model_dir(tmp_path / "m") / "model.safetensors"
    first = reference.file_sha256(weights, cache_root=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "hashes").glob("*.json"))) == 1
    reference._memo_sha256.cache_clear()  # a new process: only the disk record is left

    def boom(*args: Any) -> Any:
        raise AssertionError("hashed again")

    monkeypatch.setattr(reference, "hash_file", boom)
    assert reference.file_sha256(weights, cache_root=tmp_path / "cache") == first


# ---- the cache ------------------------------------------------------------------------------------


def test_cache_hit_does_not_compute(tmp_path: Path) -> None:
    items = pairs(21)
    first = Compute()
    values = run(items, first, tmp_path)
    assert values.dtype == torch.float32 and values.shape == (21, 2)
    assert first.calls == 6 and [len(b) for b in first.batches] == [4, 4, 4, 4, 4, 1]
    assert torch.equal(values, direct(items, 4))
    entry = tmp_path / FP
    assert sorted(p.name for p in entry.iterdir()) == [
        "manifest.json",
        "shard-000000000-000000008.safetensors",
        "shard-000000008-000000016.safetensors",
        "shard-000000016-000000021.safetensors",
    ]
    manifest = read_manifest(entry)
    assert manifest is not None and manifest["items"] == 21 and manifest["columns"] == list(COLUMNS)
    assert manifest["batch_size"] == 4 and manifest["shard_items"] == 8 and len(manifest["shards"]) == 3
    again = Compute(fail_after=0)
    assert torch.equal(run(items, again, tmp_path), values)
    assert again.calls == 0
    # another batch size is another layout: computed again, never mixed with these shards
    other = Compute()
    assert torch.equal(run(items, other, tmp_path, batch_size=2), direct(items, 2))
    assert other.calls == 11


def test_killed_precompute_resumes_from_complete_shards(tmp_path: Path) -> None:
    items = pairs(50)  # 7 shards of 8 items (the last 2), 13 batches of 4
    killed = Compute(fail_after=5)  # shards 0 and 1 complete, one batch of shard 2 done
    with pytest.raises(KeyboardInterrupt):
        run(items, killed, tmp_path)
    entry = tmp_path / FP
    assert sorted(p.name for p in entry.iterdir() if not p.name.startswith(".")) == [
        "shard-000000000-000000008.safetensors",
        "shard-000000008-000000016.safetensors",
    ]
    assert read_manifest(entry) is None
    resumed = Compute()
    values = run(items, resumed, tmp_path)
    assert resumed.calls == 13 - 4 and resumed.batches[0] == items[16:20]
    assert torch.equal(values, direct(items, 4))
    assert read_manifest(entry) is not None


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def _flip_last_byte(path: Path) -> None:  # inside the tensor's bytes: parses, checksum differs
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00" * 100)


def _other_range(path: Path) -> None:  # a valid shard for other items under this name
    path.write_bytes((path.parent / "shard-000000000-000000008.safetensors").read_bytes())


def _other_fingerprint(path: Path) -> None:  # a valid shard of another entry
    data = path.read_bytes()
    path.write_bytes(data.replace(FP.encode(), ("f" * 32).encode()))


@pytest.mark.parametrize(
    "corrupt", [_truncate, _flip_last_byte, _garbage, _other_range, _other_fingerprint, Path.unlink]
)
def test_corrupt_shard_is_recomputed_never_read(tmp_path: Path, corrupt: Any) -> None:
    items = pairs(20)
    expected = run(items, Compute(), tmp_path)
    corrupt(tmp_path / FP / "shard-000000008-000000016.safetensors")
    again = Compute()
    assert torch.equal(run(items, again, tmp_path), expected)
    assert again.calls == 2 and again.batches == [items[8:12], items[12:16]]
    assert torch.equal(run(items, Compute(fail_after=0), tmp_path), expected)  # repaired


def test_values_are_stored_exactly(tmp_path: Path) -> None:
    items = pairs(10)
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(10, 2, generator=generator, dtype=torch.float64) * torch.logspace(-40, 30, 10)[:, None]
    table = {  # subnormal to huge float32 values, and bf16/fp16/fp64 outputs
        torch.float32: wide.float(),
        torch.bfloat16: wide.bfloat16(),
        torch.float16: torch.randn(10, 2, generator=generator).half(),
        torch.float64: wide,
    }
    position = {id(item): i for i, item in enumerate(items)}
    for dtype, values in table.items():
        got = run(
            items, lambda batch, v=values: v[[position[id(i)] for i in batch]], tmp_path, fingerprint=FP[:-1] + "0"
        )
        assert torch.equal(got, values.to(torch.float32)), dtype
        for p in (tmp_path / (FP[:-1] + "0")).iterdir():
            p.unlink()


def test_bad_compute_output_is_refused_and_not_cached(tmp_path: Path) -> None:
    items = pairs(8)
    with pytest.raises(ValueError, match=r"floating \(4, 2\) tensor for items 0\.\.3; got Tensor \(4,\)"):
        run(items, lambda batch: torch.zeros(len(batch)), tmp_path)
    with pytest.raises(ValueError, match=r"floating \(4, 2\) tensor"):
        run(items, lambda batch: torch.zeros(len(batch), 2, dtype=torch.int64), tmp_path)

    def one_nan(batch: list[Mapping[str, Any]]) -> torch.Tensor:
        values = fake_values(batch)
        if batch[0] is items[4]:
            values[1, 0] = float("nan")
        return values

    with pytest.raises(ValueError, match=r"non-finite values for item\(s\) 5 "):
        run(items, one_nan, tmp_path)
    assert not list((tmp_path / FP).glob("shard-*"))


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 lowercase hex"):
        run(pairs(2), Compute(), tmp_path, fingerprint="../x")
    with pytest.raises(ValueError, match="multiple of batch_size 4"):
        run(pairs(2), Compute(), tmp_path, shard_items=6)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run(pairs(2), Compute(), tmp_path, batch_size=0)
    empty = Compute()
    assert run([], empty, tmp_path).shape == (0, 2) and empty.calls == 0
    # by default a shard holds SHARD_TARGET items rounded up to whole batches
    values = cached_logps(
        pairs(3), Compute(), fingerprint=FP, batch_size=3, columns=["a", "b"], cache_root=tmp_path / "d"
    )
    assert values.shape == (3, 2) and reference.SHARD_TARGET == 1024
    assert json.loads((tmp_path / "d" / FP / "manifest.json").read_text())["shard_items"] == 1026


# ---- several processes ----------------------------------------------------------------------------


def _worker(root: str, n: int, out: str, rank: int, world: int, init: str | None) -> None:
    """A process that fills the cache (slowly, so two of them overlap) and saves what it got."""
    import time

    if init is not None:
        torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    computed: list[int] = []

    def slow(batch: list[Mapping[str, Any]]) -> torch.Tensor:
        time.sleep(0.02)
        computed.append(items.index(batch[0]))
        return fake_values(batch)

    items = pairs(n)
    values = run(items, slow, Path(root), progress=rank == 0)
    torch.save({"values": values, "computed": computed}, out)
    if init is not None:
        torch.distributed.destroy_process_group()


def _processes(tmp_path: Path, n: int, init: str | None) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("fork")  # the test module is not importable (pytest importlib mode)
    procs = [
        context.Process(target=_worker, args=(str(tmp_path / "cache"), n, str(tmp_path / f"{r}.pt"), r, 2, init))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [torch.load(tmp_path / f"{r}.pt") for r in range(2)]


def test_two_processes_at_once_leave_a_valid_cache(tmp_path: Path) -> None:
    items = pairs(40)
    results = _processes(tmp_path, 40, init=None)
    expected = direct(items, 4)
    for result in results:
        assert torch.equal(result["values"], expected)
    check = Compute(fail_after=0)
    assert torch.equal(run(items, check, tmp_path / "cache"), expected)
    assert read_manifest(tmp_path / "cache" / FP) is not None
    assert not [p for p in (tmp_path / "cache" / FP).iterdir() if p.name.startswith(".")]


def test_distributed_ranks_share_the_missing_shards(tmp_path: Path) -> None:
    items = pairs(40)  # 5 shards of 2 batches
    run(items[:8], Compute(), tmp_path / "cache")  # shard 0 is there, 1..4 are missing
    init = f"file://{tmp_path / 'rendezvous'}"
    results = _processes(tmp_path, 40, init=init)
    expected = direct(items, 4)
    assert all(torch.equal(r["values"], expected) for r in results)
    # shards 1..4 were missing: rank 0 computed 1 and 3, rank 1 computed 2 and 4
    assert results[0]["computed"] == [8, 12, 24, 28] and results[1]["computed"] == [16, 20, 32, 36]


# ---- on the fly, and bit-equal to the cache -------------------------------------------------------


def test_frozen_reference_is_a_frozen_copy() -> None:
    policy = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    ref = frozen_reference(like=policy)
    assert policy.training and all(p.requires_grad for p in policy.parameters())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.parameters(), policy.parameters()))
    with pytest.raises(ValueError, match="exactly one"):
        frozen_reference()
    with pytest.raises(ValueError, match="exactly one"):
        frozen_reference("builtin:tiny-llama", like=policy)


def test_cached_reference_is_bit_equal_to_on_the_fly_tiny_llama(tmp_path: Path) -> None:
    from losslab.models import load_causal_lm

    policy = load_causal_lm("builtin:tiny-llama")
    loaded = frozen_reference("builtin:tiny-llama")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), policy.state_dict().values()))
    ref = frozen_reference(like=policy)
    items = pairs(10, seed=3)

    def compute(batch: list[Mapping[str, Any]]) -> torch.Tensor:
        """Summed log-probs of chosen and rejected after the prompt, right-padded rows: (B, 2)."""
        rows = [(item["prompt"], item[key]) for key in ("chosen", "rejected") for item in batch]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        scored = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, (p, c) in enumerate(rows):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
            mask[r, : len(p) + len(c)] = 1
            scored[r, len(p) : len(p) + len(c)] = True
        logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (R, T - 1, V)
        logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (R, T - 1)
        sums = (logps * scored[:, 1:]).sum(-1)  # (R,)
        return sums.view(2, len(batch)).T  # (B, 2): chosen, rejected

    fingerprint = reference_fingerprint(
        "builtin:tiny-llama", items, extra={"dtype": "float32"}, cache_root=tmp_path / "hashes"
    )
    cached = cached_logps(
        items, compute, fingerprint=fingerprint, batch_size=4, columns=COLUMNS, cache_root=tmp_path, progress=False
    )
    with torch.no_grad():
        on_the_fly = torch.cat([compute(items[a : a + 4]) for a in range(0, 10, 4)])
    assert torch.equal(cached, on_the_fly) and torch.isfinite(cached).all() and (cached < 0).all()
    reread = cached_logps(
        items, Compute(fail_after=0), fingerprint=fingerprint, batch_size=4, columns=COLUMNS, cache_root=tmp_path
    )
    assert torch.equal(reread, on_the_fly)
    assert os.listdir(tmp_path / fingerprint)
