"""Two processes (torchrun, gloo on CPU) give the same losses, gradient norms and weights as one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..conftest import free_port, train_config, wait_for


def config(out: Path, batch_size: int) -> dict:
    return train_config(
        out,
        data={"max_train_samples": 16},
        loss={"terms": [{"name": "token_cross_entropy", "label_smoothing": 0.1}]},
        training={"max_steps": 3, "batch_size": batch_size, "lr": 1e-3, "save_steps": 100},
    )


def run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def steps(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "grad_norm" in r]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.prefix) / "bin" / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_processes_equal_one(tmp_path: Path) -> None:
    """Training steps, the evaluation during training (with a per-batch regulariser, which the
    Trainer's cross-process item count must not multiply) and the final weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    for out, batch_size in ((one, 4), (two, 2)):  # 2 x 2 = the same global batch
        data = config(out, batch_size=batch_size)
        data["data"].update(validation="builtin:chatterbot", max_eval_samples=6)
        data["loss"]["terms"].append({"name": "l2", "weight": 1e-3})
        # evaluation batches of one sample: the same batches (and per-batch means) in both runs
        data["training"].update(eval_steps=3, eval_batch_size=1)
        (tmp_path / f"{out.name}.yaml").write_text(yaml.safe_dump(data))
    run([sys.executable, "-m", "losslab.cli", "train", "one.yaml"], tmp_path)
    torchrun = str(Path(sys.prefix) / "bin" / "torchrun")
    run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "losslab.cli",
            "train",
            "two.yaml",
        ],
        tmp_path,
    )
    a, b = steps(one), steps(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    evals = [
        [r for r in json.loads(f"[{','.join((out / 'log.jsonl').read_text().splitlines())}]") if "eval_loss" in r]
        for out in (one, two)
    ]
    assert len(evals[0]) == len(evals[1]) == 1
    for key in ("eval_loss", "eval_loss/token_cross_entropy", "eval_loss/l2"):
        assert evals[1][0][key] == pytest.approx(evals[0][0][key], rel=1e-5), key
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    # AdamW divides by sqrt(v): for a near-zero gradient, float reduction order (gloo all-reduce
    # vs one process) moves an update by up to a few 1e-6; 1e-5 is 1% of one step at lr 1e-3.
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow  # ~40-80 s of one core: run by hand (`pytest -m slow tests/train/test_distributed.py`)
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.prefix) / "bin" / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_sigterm_to_torchrun_and_its_workers_saves_a_checkpoint_and_a_rerun_ends_with_the_same_weights(
    tmp_path: Path, child_pids
) -> None:
    """What a cluster does at preemption or a time limit (SLURM signals every process of the job
    step): SIGTERM to each worker and to torchrun, which forwards it to the workers again. Each
    worker must take its two deliveries as one request; the workers agree on a step, save it
    and stop; the same command then resumes and ends with the weights of an uninterrupted run."""
    import signal

    torchrun = str(Path(sys.prefix) / "bin" / "torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    data = config(tmp_path / "out", batch_size=2)
    data["training"].update(max_steps=120, save_steps=5, lr=1e-3)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "losslab.cli", "train", "c.yaml"]
    out = tmp_path / "out"
    with (tmp_path / "stopped.log").open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(
            lambda: (out / "checkpoint-5" / "losslab_checkpoint.json").is_file(),
            proc,
            timeout=300,
            poll=0.01,
            what=lambda: (tmp_path / "stopped.log").read_text()[-3000:],
        )
        workers = child_pids(proc.pid, b"losslab.cli")
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    text = (tmp_path / "stopped.log").read_text()
    assert proc.returncode != 0 and "stopping after this step with a checkpoint" in text, text[-3000:]
    assert "src/losslab" not in text, text[-3000:]  # no traceback from a worker (torchrun's own agent prints one)
    assert text.count("losslab: to resume, run the same launch command again") == 1, text[-3000:]  # rank 0 only
    assert not (out / "metrics.json").exists()
    from losslab.train.checkpoints import last_complete_checkpoint

    last = last_complete_checkpoint(out)
    stopped_at = int(Path(last).name.split("-")[1])
    assert 5 <= stopped_at < 120, text[-3000:]
    assert f"stopped after step {stopped_at}, checkpoint saved in {last}" in text, text[-3000:]  # saved at the stop
    run(cmd, tmp_path)  # the same command: resumes and finishes
    straight = tmp_path / "straight"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**data, "output_dir": str(straight)}))
    run([*cmd[:-1], "s.yaml"], tmp_path)
    assert [r["loss"] for r in steps(out)][-3:] == pytest.approx([r["loss"] for r in steps(straight)][-3:], rel=1e-5)
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow  # three short runs of the tiny model, ~30-60 s: `pytest -m slow tests/train/test_distributed.py`
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.prefix) / "bin" / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_lora_in_two_processes_equals_one_with_and_without_gradient_checkpointing(tmp_path: Path) -> None:
    """LoRA under DDP: only the adapters are parameters with gradients, so DDP's buckets hold
    them alone; with gradient checkpointing (non-reentrant) each adapter's gradient must still be
    reduced once per step (the reentrant form is the "marked ready twice" failure users of
    LoRA + DDP report). Two processes x batch 2 == one x batch 4: losses, grad norms, adapters."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    runs = {"one": (4, False), "two": (2, False), "two_gc": (2, True)}
    for name, (batch_size, checkpointing) in runs.items():
        data = config(tmp_path / name, batch_size=batch_size)
        data["model"] = {"name": data["model"], "lora": lora}
        data["training"]["gradient_checkpointing"] = checkpointing
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    run([sys.executable, "-m", "losslab.cli", "train", "one.yaml"], tmp_path)
    torchrun = str(Path(sys.prefix) / "bin" / "torchrun")
    for name in ("two", "two_gc"):
        launch = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port())]
        run([*launch, "-m", "losslab.cli", "train", f"{name}.yaml"], tmp_path)
    one = tmp_path / "one"
    want = load_file(one / "model" / "adapter_model.safetensors")
    assert want and all("lora_" in key for key in want)
    # lora_B starts at zero: the adapters trained (the comparison below is not of initial values)
    assert all(want[key].abs().max() > 1e-4 for key in want if "lora_B" in key)
    for name in ("two", "two_gc"):
        a, b = steps(one), steps(tmp_path / name)
        assert len(a) == len(b) == 3, name
        for x, y in zip(a, b):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), name
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), name
        got = load_file(tmp_path / name / "model" / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(
                got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key, n=name: f"{n} {k}: {m}"
            )
