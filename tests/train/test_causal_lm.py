"""causal_lm end to end on the real Trainer: outputs, logged terms, learning, resume after SIGKILL and SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from losslab.config import load_config
from losslab.train.checkpoints import COMPLETE_MARKER, last_complete_checkpoint
from losslab.train.config import TrainConfig
from losslab.train.run import loss_adapter, train
from losslab.train.task import plan_loss

from ..conftest import train_config, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def tiny_config(tmp_path: Path, **training) -> dict:
    terms = [
        {"name": "token_cross_entropy", "label_smoothing": 0.05},
        {"name": "consistency", "weight": {"schedule": "linear", "start": 0.2, "end": 0.0}},
    ]
    return train_config(
        tmp_path / "run",
        validation=True,
        data={"max_length": 64, "max_eval_samples": 6},
        loss={"terms": terms},
        training=training,
    )


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_outputs_logs_terms_and_learns(tmp_path: Path) -> None:
    config = TrainConfig.model_validate(tiny_config(tmp_path))
    metrics = train(config)
    out = Path(config.output_dir)
    assert (out / "model" / "model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"]["terms"][1]["name"] == "consistency"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    assert saved["validation/n_tokens"] > 0 and saved["validation/perplexity"] > 1
    steps = [r for r in rows(out / "log.jsonl") if "loss/token_cross_entropy" in r and "eval_loss" not in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert steps[-1]["loss/token_cross_entropy"] < steps[0]["loss/token_cross_entropy"] - 0.1
    assert steps[0]["weight/consistency"] == pytest.approx(0.2) and steps[-1]["weight/consistency"] < 0.05


def test_fused_head_is_on_unless_a_term_needs_logits(tmp_path: Path, capsys) -> None:
    import torch

    cfg = tiny_config(tmp_path, max_steps=1)
    from losslab.train.tasks.causal_lm import build

    def built(terms):
        cfg["loss"]["terms"] = terms
        config = TrainConfig.model_validate(cfg)
        plan = plan_loss(config)
        run = build(config, plan)
        return run, loss_adapter(run, plan)

    run, _loss = built([{"name": "token_cross_entropy"}])
    assert run.forward.fused
    run, with_consistency = built([{"name": "token_cross_entropy"}, {"name": "consistency"}])
    assert not run.forward.fused
    assert "fused loss head off" in capsys.readouterr().out
    assert with_consistency.reference_params is None
    run, anchored = built([{"name": "token_cross_entropy"}, {"name": "l2_sp", "weight": 0.01}])
    assert run.forward.fused and anchored.reference_params is not None  # the l2_sp anchor: the weights before training
    for name, p in run.model.named_parameters():
        assert torch.equal(anchored.reference_params[name], p) and anchored.reference_params[name] is not p


def test_semantic_terms_get_the_last_hidden_states(tmp_path: Path) -> None:
    """Feature terms ask the model for hidden states (with or without logits) and match the
    loss functions applied to the model's own last hidden states."""
    import torch
    from transformers import TrainingArguments

    from losslab.losses.dialogue import semantic_alignment_loss
    from losslab.train.tasks.causal_lm import build
    from losslab.train.trainer import LosslabTrainer

    cfg = tiny_config(tmp_path, max_steps=1)
    for terms in (
        [{"name": "token_cross_entropy"}, {"name": "semantic_alignment", "weight": 0.5}],
        [
            {"name": "token_cross_entropy"},
            {"name": "consistency", "weight": 0.3},
            {"name": "semantic_alignment", "weight": 0.2},
        ],
    ):
        cfg["loss"]["terms"] = terms
        config = TrainConfig.model_validate(cfg)
        plan = plan_loss(config)
        run = build(config, plan)
        loss_func = loss_adapter(run, plan)
        assert run.forward.hidden_states
        trainer = LosslabTrainer(
            model=run.model, args=TrainingArguments(output_dir=str(tmp_path / "trainer")), loss_func=loss_func
        )
        batch = run.collator(run.train[:3])
        total = trainer.compute_loss(run.model, dict(batch))
        with torch.no_grad():
            hidden = run.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            ).hidden_states[-1][:, :-1]
        labels = batch["labels"][:, 1:]
        trained = labels != -100
        context = batch["attention_mask"][:, 1:].bool() & ~trained
        expected = semantic_alignment_loss(hidden, context, trained)
        got = loss_func.last.values["semantic_alignment"]
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(total) and got > 0


def test_eval_mask_fixes_the_evaluated_tokens(tmp_path: Path) -> None:
    """eval.mask: validation/test are masked by it, training by data.mask (comparable perplexity
    across variants that train on different masks)."""
    from losslab.train.tasks.causal_lm import build

    def labels(run) -> list[list[int]]:
        return [s["labels"] for s in run.validation]

    cfg = tiny_config(tmp_path, max_steps=1)

    def built(cfg):
        config = TrainConfig.model_validate(cfg)
        return build(config, plan_loss(config))

    cfg["data"]["mask"] = "assistant"
    assistant = built(cfg)
    cfg["data"]["mask"] = "all"
    trained_on_all = built(cfg)
    cfg["eval"]["mask"] = "assistant"
    fixed = built(cfg)
    assert labels(fixed) == labels(assistant) != labels(trained_on_all)
    assert [s["labels"] for s in fixed.train] == [s["labels"] for s in trained_on_all.train]


def test_batched_greedy_replies_equal_one_at_a_time() -> None:
    """Left-padded batches give each prompt the reply it gets alone, in prompt order."""
    import torch

    from losslab.models import load_causal_lm, load_tokenizer
    from losslab.train.tasks.causal_lm import greedy_replies

    tokenizer = load_tokenizer("builtin:tiny-llama")
    model = load_causal_lm("builtin:tiny-llama", dtype="float32")
    torch.manual_seed(0)
    prompts = [torch.randint(3, 2000, (n,)).tolist() for n in (5, 17, 9, 2, 30, 9, 12)]
    alone = [greedy_replies(model, tokenizer, [p], 8)[0] for p in prompts]
    assert greedy_replies(model, tokenizer, prompts, 8, batch_size=3) == alone
    assert len(set(alone)) > 1


def test_every_causal_example_config_parses() -> None:
    paths = sorted(EXAMPLES.glob("train_chat*.yaml"))
    assert paths, EXAMPLES
    for path in paths:
        assert load_config(TrainConfig, path).task == "causal_lm"


def _cli(config: Path, command: str = "train") -> tuple[subprocess.Popen, Path]:
    """Start `losslab COMMAND CONFIG`; its output goes to a file (a full pipe would stall it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = config.with_suffix(f".{time.monotonic_ns()}.log")
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "losslab.cli", command, str(config)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return proc, log


def _kill(proc: subprocess.Popen, sig: signal.Signals = signal.SIGKILL) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=300)


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # ~35-40 s of one core (CI time); run by hand: pytest tests/train/test_causal_lm.py
def test_interruptions_then_rerun_resume_to_the_same_metrics(tmp_path: Path) -> None:
    """SIGKILL while checkpoint-2 is being written, then SIGINT (clean stop, exit 130), then a
    rerun: the same metrics and per-step log as an uninterrupted run."""
    base = tiny_config(tmp_path, max_steps=6, save_steps=2)
    straight = TrainConfig.model_validate({**base, "output_dir": str(tmp_path / "straight")})
    expected = train(straight)
    config = _write({**base, "output_dir": str(tmp_path / "killed")}, tmp_path / "killed.yaml")
    out = tmp_path / "killed"

    proc, _ = _cli(config)
    wait_for(lambda: (out / "checkpoint-2").is_dir(), proc)  # the save has begun
    assert _kill(proc) == -signal.SIGKILL
    assert not (out / "metrics.json").exists()

    proc, log = _cli(config)
    wait_for(lambda: (out / "checkpoint-4" / COMPLETE_MARKER).is_file(), proc)
    assert _kill(proc, signal.SIGINT) == 130, log.read_text()[-2000:]
    stopped = log.read_text()
    assert "losslab: to resume, run the same command again: losslab train" in stopped
    assert "Traceback" not in stopped and not (out / "metrics.json").exists()
    assert last_complete_checkpoint(out) in {str(out / "checkpoint-4"), str(out / "checkpoint-5")}

    proc, log = _cli(config)
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert f"resuming from {out / 'checkpoint-'}" in log.read_text()
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(expected, rel=1e-6)
    logged = {run: [r for r in rows(tmp_path / run / "log.jsonl") if "loss" in r] for run in ("straight", "killed")}
    assert [r["step"] for r in logged["killed"]] == [r["step"] for r in logged["straight"]] == list(range(1, 7))
    assert [r["loss"] for r in logged["killed"]] == pytest.approx([r["loss"] for r in logged["straight"]], rel=1e-6)
    # the closing train_loss row: the mean over every step of the run, not over the steps since the restart
    closing = {
        run: [r for r in rows(tmp_path / run / "log.jsonl") if "train_loss" in r][-1] for run in ("straight", "killed")
    }
    assert closing["killed"]["step"] == closing["straight"]["step"] == 6
    assert closing["killed"]["train_loss"] == pytest.approx(closing["straight"]["train_loss"], rel=1e-6)


@pytest.mark.slow
def test_many_sigkills_at_random_points_then_rerun_give_the_same_metrics(tmp_path: Path) -> None:
    """Series of three SIGKILLs in a row (at random times, the second one aimed at a checkpoint
    save), then a rerun to the end. Prints the figures quoted in docs/reliability.md: kills,
    kills that left an incomplete checkpoint, reruns with identical metrics."""
    import random

    base = tiny_config(tmp_path, max_steps=8, save_steps=2)
    proc, log = _cli(_write({**base, "output_dir": str(tmp_path / "straight")}, tmp_path / "straight.yaml"))
    started = time.monotonic()
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    duration = time.monotonic() - started
    expected = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    rng = random.Random(int(os.environ.get("LOSSLAB_KILL_SEED", "0")))
    series, kills_per_series = int(os.environ.get("LOSSLAB_KILL_SERIES", "4")), 3
    kills = during_save = identical = 0
    for k in range(series):
        out = tmp_path / f"killed{k}"
        config = _write({**base, "output_dir": str(out)}, tmp_path / f"killed{k}.yaml")
        for i in range(kills_per_series):
            proc, _ = _cli(config)
            launched = time.time()
            if i == 1:  # aim at a checkpoint save: a folder this process made, not yet marked complete

                def saving(launched: float = launched, out: Path = out) -> bool:
                    return any(
                        p.stat().st_mtime >= launched and not (p / COMPLETE_MARKER).is_file()
                        for p in out.glob("checkpoint-*")
                    )

                try:
                    wait_for(saving, proc, timeout=duration * 3, poll=0.002)
                except AssertionError:
                    break  # finished before a new save
            else:
                time.sleep(rng.uniform(0.2, duration))
            if proc.poll() is not None:
                break  # finished before the kill
            _kill(proc)
            kills += 1
            during_save += any(not (p / COMPLETE_MARKER).is_file() for p in out.glob("checkpoint-*"))
        proc, log = _cli(config)
        assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
        got = json.loads((out / "metrics.json").read_text())
        identical += got == pytest.approx(expected, rel=1e-6)
    print(
        f"\nkill figures: {kills} SIGKILLs in {series} series, {during_save} left an incomplete checkpoint, "
        f"{identical}/{series} reruns with identical metrics"
    )
    assert identical == series


def test_a_model_that_cannot_run_the_head_check_keeps_the_fused_head_with_a_note(capsys) -> None:
    """The logits check runs a forward outside the training engine; where that fails (e.g.
    ZeRO-3 partitioned parameters) the run goes on with the fused head and says what to do."""
    from losslab.models import load_causal_lm
    from losslab.train.tasks.causal_lm import checked_head

    model = load_causal_lm("builtin:tiny-llama")
    assert checked_head(model)
    model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("parameters are partitioned"))
    assert checked_head(model)
    out = capsys.readouterr().out
    assert "could not compare" in out and "parameters are partitioned" in out and "loss.fused: false" in out
