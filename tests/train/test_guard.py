"""Numerics and faults on the real Trainer: non-finite steps skipped and counted, the stop
after the limit, batches with no trained token, incomplete checkpoints, log repair."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from losslab import cli
from losslab.train import run as train_run
from losslab.train import tasks
from losslab.train.checkpoints import (
    COMPLETE_MARKER,
    is_complete,
    keep_log_rows,
    last_complete_checkpoint,
    read_marker,
    remove_incomplete_checkpoints,
    rotate_checkpoints,
)
from losslab.train.config import TrainConfig
from losslab.train.task import plan_loss
from losslab.train.tasks import causal_lm
from losslab.train.trainer import LosslabTrainer

from ..conftest import train_config, wait_for
from .conftest import signals_delivered

BATCH = 4


def config(out: Path, **training) -> dict:
    return train_config(out, training={"batch_size": BATCH, "scheduler": "constant", "save_steps": 2, **training})


@pytest.fixture
def sequential(monkeypatch):
    """Batches in data order, so a run without some batches is a plain reference."""
    real = train_run.training_arguments

    def arguments(*args, **kwargs):
        a = real(*args, **kwargs)
        a.train_sampling_strategy = "sequential"
        return a

    monkeypatch.setattr(train_run, "training_arguments", arguments)


def inject(monkeypatch, nan_loss: set[int] = frozenset(), nan_grad: set[int] = frozenset()) -> None:
    """At these optimizer steps (1-based, as logged) the loss is NaN, or the loss is finite and
    one gradient is NaN (d sqrt(x)/dx at 0 is inf, times 0)."""
    real = LosslabTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step + 1
        if model.training and step in nan_loss:
            loss = loss * float("nan")
        if model.training and step in nan_grad:
            loss = loss + torch.sqrt(next(model.parameters()).sum() * 0.0)
        return loss

    monkeypatch.setattr(LosslabTrainer, "compute_loss", compute_loss)


class ChangedCausalLM:
    """The causal_lm task with its training samples changed by ``change(run)``, registered in
    place of the real one."""

    def __init__(self, change) -> None:
        self.change = change
        self.loss_needs = causal_lm.loss_needs

    def build(self, cfg, plan):
        run = causal_lm.build(cfg, plan)
        self.change(run)
        return run


def build(cfg):
    return causal_lm.build(cfg, plan_loss(cfg))


def without_batches(monkeypatch, steps: set[int]) -> None:
    """The causal_lm task minus the samples of these optimizer steps."""

    def change(run):
        run.train = [f for i, f in enumerate(run.train) if i // BATCH + 1 not in steps]

    monkeypatch.setitem(tasks.TASKS, "causal_lm", ChangedCausalLM(change))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path: Path, sequential, monkeypatch, capsys) -> None:
    with monkeypatch.context() as m:
        without_batches(m, {3, 5})
        reference = train_run.train(TrainConfig.model_validate(config(tmp_path / "ref", max_steps=4)))
    inject(monkeypatch, nan_loss={3}, nan_grad={5})
    metrics = train_run.train(TrainConfig.model_validate(config(tmp_path / "nan")))

    # the skipped steps changed nothing: the weights are those of a run without their batches
    got, want = weights(tmp_path / "nan"), weights(tmp_path / "ref")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert metrics["train/nonfinite_steps"] == 2 and metrics["train/steps"] == 6 and reference["train/steps"] == 4
    assert json.loads((tmp_path / "nan" / "metrics.json").read_text())["train/nonfinite_steps"] == 2
    out = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient; update skipped (1 of at most 5)" in out
    assert "step 5: non-finite loss or gradient; update skipped (2 of at most 5)" in out
    logged = {r["step"]: r for r in rows(tmp_path / "nan" / "log.jsonl") if "loss" in r}
    assert [logged[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    # complete checkpoints only, the count kept in their marker for resume
    assert last_complete_checkpoint(tmp_path / "nan") == str(tmp_path / "nan" / "checkpoint-6")
    assert read_marker(tmp_path / "nan" / "checkpoint-6") == {"step": 6, "nonfinite_steps": [3, 5]}
    assert sorted(p.name for p in (tmp_path / "nan").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_run_stops_at_the_limit_with_a_message_and_exit_status_2(
    tmp_path: Path, sequential, monkeypatch, capsys
) -> None:
    with monkeypatch.context() as m:
        without_batches(m, {3})
        train_run.train(TrainConfig.model_validate(config(tmp_path / "ref", max_steps=3, save_steps=3)))
    inject(monkeypatch, nan_loss={3, 5}, nan_grad={6})
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "nan", max_nonfinite_steps=2)))
    capsys.readouterr()
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "training.max_nonfinite_steps: training stopped at step 5: 2 steps had a non-finite loss or gradient" in err
    assert f"Last good checkpoint: {tmp_path / 'nan' / 'checkpoint-4'}" in err and "Traceback" not in err
    out = tmp_path / "nan"
    assert not (out / "metrics.json").exists() and not (out / "model").exists()
    # the last good checkpoint is intact: step 4 = 3 good updates, as the reference's end
    kept = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    for name, tensor in weights(tmp_path / "ref").items():
        torch.testing.assert_close(kept[name], tensor, rtol=0, atol=0, msg=name)
    assert read_marker(out / "checkpoint-4")["nonfinite_steps"] == [3]


def test_batches_without_trained_tokens_give_zero_loss_and_no_update(tmp_path: Path, monkeypatch) -> None:
    """Every label -100: loss 0, gradient 0 (AdamW's first step then moves nothing), not a
    non-finite step."""

    def change(run):
        for f in run.train:
            f["labels"] = [-100] * len(f["labels"])

    monkeypatch.setitem(tasks.TASKS, "causal_lm", ChangedCausalLM(change))
    cfg = config(tmp_path / "masked", max_steps=1)
    metrics = train_run.train(TrainConfig.model_validate(cfg))
    initial = build(TrainConfig.model_validate(cfg)).model.state_dict()
    for name, tensor in weights(tmp_path / "masked").items():
        torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0, msg=name)
    step = next(r for r in rows(tmp_path / "masked" / "log.jsonl") if "loss" in r)
    assert step["loss"] == 0.0 and step["grad_norm"] == 0.0 and metrics["train/nonfinite_steps"] == 0


def checkpoint(root: Path, step: int, *, complete: bool, log_rows: int = 0) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{}] * log_rows}))
    if complete:
        (folder / COMPLETE_MARKER).write_text(json.dumps({"step": step, "nonfinite_steps": []}))
    return folder


def test_incomplete_checkpoints_are_ignored_removed_and_rotated_last(tmp_path: Path) -> None:
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        checkpoint(tmp_path, step, complete=complete)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert sorted(remove_incomplete_checkpoints(tmp_path)) == [
        str(tmp_path / "checkpoint-10"),
        str(tmp_path / "checkpoint-6"),
    ]
    checkpoint(tmp_path, 6, complete=True)
    checkpoint(tmp_path, 8, complete=True)
    rotate_checkpoints(tmp_path, keep=2, protect=str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-8"]
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_log_keeps_the_rows_written_before_the_resumed_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    keep_log_rows(log, str(checkpoint(tmp_path, 3, complete=True, log_rows=3)))
    assert rows(log) == [{"step": 1}, {"step": 2}, {"step": 3}]
    keep_log_rows(log, None)  # a fresh start
    assert log.read_text() == ""


def test_resume_refuses_an_incomplete_checkpoint(tmp_path: Path) -> None:
    from losslab.errors import UserError

    cfg = TrainConfig.model_validate(config(tmp_path / "run", max_steps=1))
    task = build(cfg)
    trainer = LosslabTrainer(
        model=task.model,
        args=train_run.training_arguments(cfg, has_eval=False),
        train_dataset=task.train,
        data_collator=task.collator,
        loss_func=train_run.loss_adapter(task, plan_loss(cfg)),
    )
    folder = checkpoint(tmp_path / "run", 1, complete=False)
    with pytest.raises(UserError, match="incomplete"):
        trainer.train(resume_from_checkpoint=str(folder))
    with pytest.raises(UserError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_from_the_final_checkpoint_does_no_extra_step(tmp_path: Path) -> None:
    """A run killed during its final evaluation resumes from checkpoint-3 (= max_steps, mid-epoch):
    no fourth step (Trainer 5.24 alone would run one), the same weights and metrics."""
    cfg = TrainConfig.model_validate(config(tmp_path / "run", max_steps=3, save_steps=3))
    first = train_run.train(cfg)
    before = weights(tmp_path / "run")
    (tmp_path / "run" / "metrics.json").unlink()
    again = train_run.train(cfg)
    assert again == first and again["train/steps"] == 3
    for name, tensor in weights(tmp_path / "run").items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("interrupt", [True, False])
def test_save_total_limit_1_with_a_best_model_keeps_what_a_rerun_needs(tmp_path: Path, interrupt: bool) -> None:
    """At save_total_limit 1 the Trainer's end of training deletes every checkpoint but the best.
    After Ctrl-C the newest checkpoint is the resume point and must stay; after a normal end only
    the best stays (as in the Trainer), and the others are deleted marker first."""
    import os
    import signal

    from losslab.train.signals import Interrupted

    data = config(
        tmp_path / "out",
        max_steps=5,
        save_steps=None,
        eval_steps=1,
        save_total_limit=1,
        early_stopping_patience=100,
        greater_is_better=True,
    )  # the loss falls, so the "best" is step 1
    data["data"]["validation"] = "builtin:chatterbot"
    data["data"]["max_eval_samples"] = 8
    cfg = TrainConfig.model_validate(data)

    def hook(step: int, metrics) -> None:
        if interrupt and step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "out"
    if interrupt:
        with pytest.raises(Interrupted, match="checkpoint saved in .*checkpoint-4"):
            train_run.train(cfg, on_evaluate=hook)
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-4"]
        assert last_complete_checkpoint(out) == str(out / "checkpoint-4")
    else:
        train_run.train(cfg, on_evaluate=hook)
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


class _Asked:
    stop_requested = False
    stop_signal = None


@pytest.mark.parametrize("launcher", [False, True], ids=["alone", "under_torchrun"])
def test_one_request_delivered_twice_is_one_request(monkeypatch, launcher: bool) -> None:
    """Alone, a repeat within REPEAT_AFTER_S is the same request and a later one stops at once;
    under a launcher the second delivery never stops at once, however late it is handled (a
    cluster signals the worker and torchrun forwards it too), the third does."""
    import os
    import signal

    from losslab.train import signals as guard

    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    if launcher:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setattr(guard, "REPEAT_AFTER_S", 0.0 if launcher else 3600.0)
    trainer = _Asked()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with guard.stop_on_signals(trainer):
        os.kill(os.getpid(), signal.SIGTERM)
        assert trainer.stop_requested and trainer.stop_signal == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # the second delivery: the same request
        if not launcher:
            monkeypatch.setattr(guard, "REPEAT_AFTER_S", 0.0)
        with pytest.raises(KeyboardInterrupt):  # asked again: stop at once
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_trainer_data_loader_workers_outlive_sigint_and_sigterm(tmp_path: Path, child_pids) -> None:
    """The Trainer's loaders (train, eval, test; accelerate's wrappers around torch's DataLoader)
    start workers that ignore both signals, after the Trainer's own seeding."""
    import signal

    from losslab.train.signals import WorkerIgnoresStopSignals

    cfg = TrainConfig.model_validate(config(tmp_path / "out", dataloader_workers=2))
    task = build(cfg)
    trainer = LosslabTrainer(
        model=task.model,
        args=train_run.training_arguments(cfg, has_eval=False),
        train_dataset=task.train,
        eval_dataset=task.train[:8],
        data_collator=task.collator,
        loss_func=train_run.loss_adapter(task, plan_loss(cfg)),
    )
    train = trainer.get_train_dataloader()
    init = train.base_dataloader.worker_init_fn
    assert isinstance(init, WorkerIgnoresStopSignals) and init.inner is not None  # the Trainer's seeding kept
    for loader in (trainer.get_eval_dataloader(), trainer.get_test_dataloader(task.train[:8])):
        assert isinstance(loader.base_dataloader.worker_init_fn, WorkerIgnoresStopSignals)
        assert not isinstance(loader.base_dataloader.worker_init_fn.inner, WorkerIgnoresStopSignals)
    before = set(child_pids(os.getpid()))
    batches = iter(train)
    got = [next(batches), next(batches)]  # one from each worker: both have started
    workers = sorted(set(child_pids(os.getpid())) - before)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    wait_for(lambda: signals_delivered(workers, (signal.SIGTERM, signal.SIGINT)), timeout=30)
    got += list(batches)
    assert len(got) == len(task.train) // BATCH


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_data_loader_workers_outlive_sigint_and_sigterm(context: str) -> None:
    """Workers with WorkerIgnoresStopSignals keep serving after SIGTERM and SIGINT (a cluster, a
    terminal or killpg reaches them too); without it a worker dies on SIGTERM (PyTorch's
    handler), and on SIGINT when spawned, and the next batch raises "DataLoader worker ... exited".
    (A spawned worker still starting up, before its worker_init_fn, is not covered.)"""
    import os
    import signal

    from torch.utils.data import DataLoader

    from losslab.train.signals import WorkerIgnoresStopSignals

    loader = DataLoader(
        list(range(40)),
        batch_size=4,
        num_workers=2,
        multiprocessing_context=context,
        worker_init_fn=WorkerIgnoresStopSignals(),
    )
    batches = iter(loader)
    first = [next(batches), next(batches)]  # one from each worker: both have started
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    wait_for(lambda: signals_delivered([w.pid for w in batches._workers], (signal.SIGTERM, signal.SIGINT)), timeout=30)
    assert all(w.is_alive() for w in batches._workers)
    assert torch.cat([*first, *batches]).tolist() == list(range(40))


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_to_the_process_group_with_data_loader_workers_stops_once_with_a_checkpoint(
    tmp_path: Path, signame: str
) -> None:
    """Ctrl-C in a terminal, or SIGTERM to the process group (a cluster, killpg), also reaches the
    data-loader workers: they keep serving, the run stops once, with a checkpoint, exit 128 + signal."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config(out, max_steps=300, save_steps=5, dataloader_workers=2)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with (tmp_path / "log.txt").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "losslab.cli", "train", str(tmp_path / "c.yaml")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            lambda: (out / "checkpoint-5" / COMPLETE_MARKER).is_file(),
            proc,
            timeout=240,
            poll=0.01,
            what=lambda: (tmp_path / "log.txt").read_text()[-3000:],
        )
        os.killpg(proc.pid, getattr(signal, signame))
        assert proc.wait(timeout=120) == 128 + getattr(signal, signame), (tmp_path / "log.txt").read_text()[-3000:]
    text = (tmp_path / "log.txt").read_text()
    assert text.count("stopping after this step with a checkpoint") == 1 and "Traceback" not in text, text[-3000:]
    last = last_complete_checkpoint(out)
    assert f"checkpoint saved in {last}" in text and not (out / "metrics.json").exists(), text[-3000:]


def test_a_stop_asked_after_the_last_step_check_still_stops_before_evaluation(tmp_path: Path, monkeypatch) -> None:
    """Asked during the last step, after every process agreed on it: training completes with its
    final checkpoint, then the run stops instead of going on to evaluate; a rerun does no step."""
    from losslab.train.guard import StepGuard
    from losslab.train.signals import Interrupted

    real = StepGuard._get_grad_norm

    def last_step_asks(self, model, grad_norm=None):
        result = real(self, model, grad_norm)
        if self.state.global_step + 1 == self.state.max_steps:
            self.stop_requested, self.stop_signal = True, 15
        return result

    monkeypatch.setattr(StepGuard, "_get_grad_norm", last_step_asks)
    out = tmp_path / "out"
    cfg = TrainConfig.model_validate(config(out))
    with pytest.raises(Interrupted, match=f"stopped after step 6, checkpoint saved in {out / 'checkpoint-6'}") as stop:
        train_run.train(cfg)
    assert stop.value.exit_status == 143
    assert is_complete(out / "checkpoint-6") and not (out / "model").exists() and not (out / "metrics.json").exists()
    monkeypatch.setattr(StepGuard, "_get_grad_norm", real)
    metrics = train_run.train(cfg)
    assert metrics["train/steps"] == 6 and len([r for r in rows(out / "log.jsonl") if "grad_norm" in r]) == 6
