"""The ``distill`` task on the tiny Llama (teacher) and a one-layer student built from it: the
cached teacher top-k equals the live one bit for bit, the half-depth student keeps the teacher's
layers, on-policy mixing, the teacher cache never half-read, bad configs, and LoRA on the student
(only its adapters train, the fused heads equal the plain ones, the adapter reloads, resume, the
student's own base as its teacher)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from losslab.errors import UserError
from losslab.losses.common import TeacherTopK
from losslab.models import load_causal_lm
from losslab.train.config import TrainConfig
from losslab.train.shard_cache import read_manifest
from losslab.train.tasks.distill_batches import DistillCollator, OnPolicy, TeacherSide
from losslab.train.tasks.distill_models import layers_to_keep, student_from_teacher
from losslab.train.teacher_cache import cached_teacher_topk, item_topk, trained_positions

from ..bad_input import run_cli
from ..conftest import TINY_LLAMA, train_config

STUDENT = {"init_from": "teacher", "keep_layers": [0]}


def distill_config(out: Path | None, **distill: Any) -> dict[str, Any]:
    config = train_config(out, task="distill", distill={"teacher": TINY_LLAMA, "student": STUDENT, **distill})
    del config["model"]
    return config


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    model = load_causal_lm(TINY_LLAMA)
    model.eval().requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def samples(smollm2_tokenizer: Any) -> list[dict]:
    from losslab.train.tasks.causal_lm import build_splits

    config = TrainConfig.model_validate(distill_config(Path("unused"), top_k=5))
    return build_splits(config, smollm2_tokenizer, task="distill").samples["train"][:12]


def topk_forward_kl(student_logits: torch.Tensor, topk: TeacherTopK, labels: torch.Tensor) -> torch.Tensor:
    """A plain top-k forward KL (teacher renormalised over its k ids), mean over trained positions."""
    p = topk.logits.log_softmax(-1)  # (B, T, k)
    q = student_logits.log_softmax(-1).gather(-1, topk.indices)  # (B, T, k)
    rows = (p.exp() * (p - q)).sum(-1)  # (B, T)
    mask = labels != -100
    return (rows * mask).sum() / mask.sum()


def test_cached_topk_is_bit_equal_to_the_live_teacher(teacher: Any, samples: list[dict], tmp_path: Path) -> None:
    """The same top-k step (one sample at a time) through the cache and live, in batches of
    another composition than the cache's: the loss inputs and the loss are bit-equal."""
    from losslab.masking import PaddedCollator
    from losslab.train.next_token import NextTokenForward
    from losslab.train.tasks.distill_batches import DistillForward

    k = 5
    calls = []

    def compute(item: dict) -> TeacherTopK:
        calls.append(1)
        return item_topk(teacher, item["input_ids"], trained_positions(item["labels"]), k)

    cached = cached_teacher_topk(samples, compute, fingerprint="a" * 32, top_k=k, cache_root=tmp_path, progress=False)
    assert len(calls) == len(samples)
    reread = cached_teacher_topk(samples, compute, fingerprint="a" * 32, top_k=k, cache_root=tmp_path)
    assert len(calls) == len(samples) and all(torch.equal(a.logits, b.logits) for a, b in zip(cached, reread))
    features = [{**s, "teacher_topk": t} for s, t in zip(samples, cached)]
    student = student_from_teacher(teacher, [0])
    pad = PaddedCollator(0)
    live = DistillForward(NextTokenForward(), TeacherSide("topk", teacher, k))
    offline = DistillForward(NextTokenForward(), TeacherSide("topk", None, k))
    for order in ([0, 5, 2, 7], [11, 1, 3], [4, 6, 8, 9, 10]):
        batch_live = DistillCollator(pad, packed=False)([samples[i] for i in order])
        batch_cached = DistillCollator(pad, packed=False, top_k=k)([features[i] for i in order])
        a, b = live(student, batch_live), offline(student, batch_cached)
        assert a.teacher_topk is not None and b.teacher_topk is not None
        assert torch.equal(a.teacher_topk.logits, b.teacher_topk.logits)
        assert torch.equal(a.teacher_topk.indices, b.teacher_topk.indices)
        assert a.labels is not None and a.logits is not None and b.logits is not None
        trained = a.labels != -100
        assert bool((a.teacher_topk.logits[trained][:, :-1] >= a.teacher_topk.logits[trained][:, 1:]).all())
        loss_a = topk_forward_kl(a.logits, a.teacher_topk, a.labels)
        loss_b = topk_forward_kl(b.logits, b.teacher_topk, a.labels)
        assert torch.isfinite(loss_a) and torch.equal(loss_a, loss_b)


def test_packed_batches_carry_the_same_topk(teacher: Any, samples: list[dict]) -> None:
    from losslab.masking import PackedCollator

    k = 3
    per_item = [item_topk(teacher, s["input_ids"], trained_positions(s["labels"]), k) for s in samples[:4]]
    features = [{**s, "teacher_topk": t} for s, t in zip(samples[:4], per_item)]
    batch = DistillCollator(PackedCollator(), packed=True, top_k=k)(features)
    inputs = TeacherSide("topk", teacher, k)
    from losslab.losses.composite import LossInputs

    live = LossInputs()
    inputs.fill(live, {k_: v for k_, v in batch.items() if not k_.startswith("teacher_topk")}, {})
    assert live.teacher_topk is not None
    assert torch.equal(live.teacher_topk.logits, batch["teacher_topk_logits"][:, :-1])
    assert int((batch["teacher_topk_logits"] != 0).any(-1).sum()) == sum(len(t.logits) for t in per_item)


def test_teacher_cache_resumes_and_never_reads_a_bad_shard(tmp_path: Path) -> None:
    items = [{"input_ids": list(range(n + 3)), "labels": [-100, -100, *range(n + 1)]} for n in range(10)]

    def fake(item: dict) -> TeacherTopK:
        rows = len(trained_positions(item["labels"]))
        base = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + len(item["input_ids"])
        return TeacherTopK(base.flip(-1), torch.ones(rows, 2, dtype=torch.long))

    done: list[int] = []

    def killed(item: dict) -> TeacherTopK:
        if len(done) == 7:
            raise KeyboardInterrupt
        done.append(1)
        return fake(item)

    with pytest.raises(KeyboardInterrupt):
        cached_teacher_topk(items, killed, fingerprint="b" * 32, top_k=2, cache_root=tmp_path, shard_items=3)
    entry = tmp_path / ("b" * 32)
    assert sorted(p.name for p in entry.glob("shard-*")) == [
        "shard-000000000-000000003.safetensors",
        "shard-000000003-000000006.safetensors",
    ]
    assert read_manifest(entry) is None
    shard = entry / "shard-000000003-000000006.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])  # truncated: recomputed, not read
    again: list[int] = []
    got = cached_teacher_topk(
        items, lambda i: again.append(1) or fake(i), fingerprint="b" * 32, top_k=2, cache_root=tmp_path, shard_items=3
    )
    assert len(again) == 7 and read_manifest(entry) is not None
    for item, value in zip(items, got):
        assert torch.equal(value.logits, fake(item).logits) and value.indices.dtype == torch.int64


def test_student_keeps_the_teachers_layers() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    assert layers_to_keep("even", 30) == list(range(0, 30, 2)) and len(layers_to_keep("even", 30)) == 15
    assert layers_to_keep("odd", 5) == [1, 3]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2
    )
    teacher = LlamaForCausalLM(config).eval()
    student = student_from_teacher(teacher, "even").eval()
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t, s = teacher.state_dict(), student.state_dict()
    for name, value in s.items():
        source = name.replace("layers.1.", "layers.2.")
        assert torch.equal(value, t[source]), name
    # the student is the teacher without layers 1 and 3: same output as running the teacher's kept layers
    ids = torch.tensor([[1, 5, 7, 9]])
    del teacher.model.layers[3], teacher.model.layers[1]
    teacher.config.num_hidden_layers = 2
    for i, layer in enumerate(teacher.model.layers):
        layer.self_attn.layer_idx = i
    torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    with pytest.raises(UserError, match=r"layers \[4\] do not exist: the teacher has 4 decoder layers"):
        config.num_hidden_layers = 4
        student_from_teacher(LlamaForCausalLM(config), [0, 4])


def test_on_policy_mixing(teacher: Any, samples: list[dict]) -> None:
    from losslab.masking import PaddedCollator
    from losslab.train.next_token import NextTokenForward
    from losslab.train.tasks.distill_batches import DistillForward

    student = student_from_teacher(teacher, [0]).train()
    batch = DistillCollator(PaddedCollator(0), packed=False)(samples[:3])
    off = OnPolicy(0.0, seed=0, pad_token_id=0)
    forward = DistillForward(NextTokenForward(), TeacherSide("logits", teacher), off)
    inputs = forward(student, forward.prepare_training_batch(student, batch))
    assert off.generated == 0 and torch.equal(inputs.labels, batch["labels"][:, 1:])  # lmbda 0: off-policy
    on = OnPolicy(1.0, seed=0, pad_token_id=0)
    torch.manual_seed(0)
    forward = DistillForward(NextTokenForward(), TeacherSide("logits", teacher), on)
    inputs = forward(student, forward.prepare_training_batch(student, batch))
    assert on.generated == 1 and inputs.teacher_logits is not None and inputs.labels is not None
    assert student.training  # generation ran in eval mode and put it back
    new_labels = inputs.labels
    for row in range(3):
        old = batch["labels"][row, 1:]
        trained = (old != -100).nonzero().flatten()
        first = int(trained[0])
        assert torch.equal(new_labels[row, :first], old[:first])  # the prompt is untouched
        n_new = int((new_labels[row] != -100).sum())
        assert 1 <= n_new <= len(trained)
    assert not torch.equal(new_labels, batch["labels"][:, 1:])  # the student's tokens, not the data's
    half = OnPolicy(0.5, seed=0, pad_token_id=0)
    decisions = [half.wants({"input_ids": torch.tensor([[i, i + 1]])}) for i in range(200)]
    assert 70 < sum(decisions) < 130
    assert decisions == [half.wants({"input_ids": torch.tensor([[i, i + 1]])}) for i in range(200)]


def test_a_teacher_head_with_a_bias_gives_the_same_loss_fused_and_from_logits(
    teacher: Any, samples: list[dict]
) -> None:
    """The fused teacher side hands the head's bias to the loss: the distillation loss from the
    teacher's hidden states and head equals the one from its logits, bias included."""
    import copy

    from losslab.losses import build_term
    from losslab.masking import PaddedCollator
    from losslab.train.next_token import NextTokenForward

    biased = copy.deepcopy(teacher)
    old = biased.lm_head
    biased.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        biased.lm_head.weight.copy_(old.weight)
        biased.lm_head.bias.copy_(torch.randn(old.out_features, generator=torch.Generator().manual_seed(0)) * 4)
    biased.config.tie_word_embeddings = False
    student = student_from_teacher(teacher, [0]).eval()
    batch = DistillCollator(PaddedCollator(0), packed=False)(samples[:3])
    term = build_term({"name": "distillation", "divergence": "forward_kl"})
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    head = student.get_output_embeddings()
    with torch.no_grad():
        fused = NextTokenForward(lm_head=head, fused=True, hidden_states=True)(student, batch)
        TeacherSide("fused", biased).fill(fused, batch, model_inputs)
        plain = NextTokenForward()(student, batch)
        TeacherSide("logits", biased).fill(plain, batch, model_inputs)
    assert fused.logits is None and fused.teacher_lm_head_bias is not None and plain.teacher_logits is not None
    want = float(term(plain))
    assert float(term(fused).detach()) == pytest.approx(want, rel=1e-5)
    fused.teacher_lm_head_bias = None  # the check can fail: without the bias the loss differs
    assert float(term(fused).detach()) != pytest.approx(want, rel=1e-3)


def test_an_on_policy_run_resumes_to_the_same_weights(tmp_path: Path, capsys: Any) -> None:
    """lmbda = 1 (every batch completed by the student, sampled): a run killed after its step-2
    checkpoint and rerun ends with the same losses and weights as the run that was not killed.
    The completions are sampled from a generator seeded by the batch, so the order in which the
    Trainer draws batches and restores the random state on resume does not change them."""
    import json
    import shutil

    from safetensors.torch import load_file

    from losslab.train.run import train

    def config(out: Path) -> TrainConfig:
        c = distill_config(out, lmbda=1.0)
        c["data"]["max_train_samples"] = 8
        c["training"].update(max_steps=4, batch_size=2, save_steps=2)
        return TrainConfig.model_validate(c)

    def losses(out: Path) -> list[float]:
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "grad_norm" in r]

    whole = tmp_path / "whole"
    train(config(whole))
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    for path in ("checkpoint-4", "model"):  # as if killed after the step-2 checkpoint
        shutil.rmtree(killed / path)
    (killed / "metrics.json").unlink()
    capsys.readouterr()
    train(config(killed))
    assert f"resuming from {killed / 'checkpoint-2'}" in capsys.readouterr().out
    assert len(losses(whole)) == 4 and losses(killed) == losses(whole)
    first, again = (load_file(str(out / "model" / "model.safetensors")) for out in (whole, killed))
    assert all(torch.equal(again[name], first[name]) for name in first)


def test_on_policy_completions_are_counted_as_the_tokens_trained(tmp_path: Path, monkeypatch: Any) -> None:
    """The step's token count (``num_items_in_batch``, the loss's denominator) is taken after the
    on-policy completions: here every completion ends after its first token (as at an early
    end-of-sequence), and each step's count is the sum of the tokens its micro-batches train,
    not the data's longer answers."""
    from losslab.train.adapter import LossAdapter
    from losslab.train.run import train

    real_complete, real_loss = OnPolicy.complete, LossAdapter.compute_loss

    def one_token(self: OnPolicy, model: Any, batch: dict) -> dict:
        new = real_complete(self, model, batch)
        trained = new["labels"] != -100
        first = trained & (trained.cumsum(dim=1) == 1)
        new["labels"] = new["labels"].masked_fill(trained & ~first, -100)
        return new

    seen: list[tuple[int, int]] = []  # (tokens the micro-batch trains, num_items_in_batch)

    def spy(self: LossAdapter, model: Any, batch: dict, num_items_in_batch: Any = None) -> Any:
        if model.training:
            seen.append((int((batch["labels"][:, 1:] != -100).sum()), int(num_items_in_batch)))
        return real_loss(self, model, batch, num_items_in_batch)

    monkeypatch.setattr(OnPolicy, "complete", one_token)
    monkeypatch.setattr(LossAdapter, "compute_loss", spy)
    config = distill_config(tmp_path, lmbda=1.0)
    config["data"]["max_train_samples"] = 8
    config["training"].update(max_steps=2, batch_size=2, grad_accum=2)
    train(TrainConfig.model_validate(config))
    assert len(seen) == 4
    for step in (seen[:2], seen[2:]):
        trained = [n for n, _ in step]
        assert all(n <= 2 for n in trained)  # one token per row: the completions were trained on
        assert {count for _, count in step} == {sum(trained)}


@pytest.mark.parametrize(
    ("distill", "message"),
    [
        ({"cache": True}, "distill.cache stores the teacher's top-k logits: set distill.top_k"),
        ({"top_k": 4, "cache": True, "lmbda": 0.5}, "needs the live teacher"),
        ({"lmbda": 1.5}, "less than or equal to 1"),
        ({"student": {"init_from": "teacher", "keep_layers": "every"}}, "'even' or 'odd'"),
        ({"student": {"init_from": "student"}}, "'teacher'"),
        ({"top_k": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_distill_options_name_the_allowed_values(distill: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(distill_config(Path("out"), **distill))


def test_no_teacher_is_a_config_error(tmp_path: Path, capsys: Any) -> None:
    config = distill_config(tmp_path / "out")
    del config["distill"]["teacher"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2 and "distill.teacher: task distill needs distill.teacher" in err


def test_a_distill_section_under_another_task_is_a_config_error(tmp_path: Path, capsys: Any) -> None:
    """Forgetting ``task: distill`` would otherwise train plain SFT and ignore the teacher."""
    config = train_config(tmp_path / "out", distill={"teacher": TINY_LLAMA})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2 and "read by task distill only" in err and "causal_lm" in err


def test_a_student_with_another_vocabulary_is_a_config_error(
    tmp_path: Path, capsys: Any, no_model: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any model weight is read: a tiny Llama on BERT's tokenizer as the student."""
    from transformers import AutoTokenizer, LlamaConfig

    import losslab.train.tasks.distill_models as models
    from losslab.models import resolve

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))

    student = tmp_path / "student"
    tokenizer = AutoTokenizer.from_pretrained(resolve("builtin:minilm-l6"))
    tokenizer.save_pretrained(student)
    LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(student)
    config = distill_config(tmp_path / "out")
    config["model"] = str(student)
    del config["distill"]["student"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2
    assert "distill.teacher" in err and "builtin:tiny-llama" in err and str(student) in err
    assert "different vocabularies" in err and "no vocabulary mapping" in err


@pytest.mark.slow
def test_training_from_the_cache_equals_training_with_the_live_teacher(tmp_path: Path) -> None:
    """The acceptance check end to end: the same run (top-5 forward KL + CE, shuffled batches of
    4, 3 steps) from the cache and with the live teacher logs bit-equal losses and ends with
    bit-equal weights; the cached run never loads the teacher after the precompute."""
    import json

    from safetensors.torch import load_file

    from losslab.train.run import train

    terms = [{"name": "distillation", "divergence": "forward_kl", "temperature": 2.0}, {"name": "token_cross_entropy"}]
    runs = {}
    for cache in (True, False, True):
        out = tmp_path / f"run{len(runs)}"
        config = distill_config(out, top_k=5, cache=cache)
        config["loss"] = {"terms": terms}
        config["data"]["max_train_samples"] = 12
        config["training"]["max_steps"] = 3
        metrics = train(TrainConfig.model_validate(config))
        assert 0 <= metrics.get("train/steps", 0) == 3
        logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[len(runs)] = (
            [(r["loss"], r["loss/distillation"], r["loss/token_cross_entropy"]) for r in logged if "grad_norm" in r],
            load_file(out / "model" / "model.safetensors"),
            json.loads((out / "summary.json").read_text())["teacher"],
        )
    (cached, w_cached, how_c), (live, w_live, how_l), (again, _, _) = runs[0], runs[1], runs[2]
    assert how_c == "cache (top 5)" and how_l == "live (topk, top 5)"
    assert len(cached) == 3 and cached == live == again  # floats from log.jsonl: bit-equal
    assert all(torch.equal(w_cached[name], w_live[name]) for name in w_cached)


def test_the_example_trains_on_the_tiny_teacher(tmp_path: Path) -> None:
    """examples/train_distill.yaml (forward KL, live teacher, both heads fused) on the tiny Llama
    teacher and its one-layer student: 2 steps, evaluated with generation."""
    import json

    from losslab.config import load_config
    from losslab.train.run import train

    tiny = [
        "distill.teacher=builtin:tiny-llama",
        "training.max_steps=2",
        "data.max_train_samples=8",
        "data.max_eval_samples=4",
        "data.max_length=48",
        "eval.generation_samples=2",
        "eval.max_new_tokens=4",
        f"output_dir={tmp_path}",
    ]
    example = Path(__file__).parents[2] / "examples" / "train_distill.yaml"
    metrics = train(load_config(TrainConfig, example, tiny))
    assert metrics["train/steps"] == 2
    for split in ("validation", "test"):
        assert 0 <= metrics[f"{split}/teacher_agreement"] <= 1 and metrics[f"{split}/perplexity"] > 1
        assert f"{split}/chrf" in metrics
    assert json.loads((tmp_path / "summary.json").read_text())["teacher"] == "live (fused)"
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["loss/distillation"] > 0 for r in logged if "grad_norm" in r)


# ---- LoRA on the student --------------------------------------------------------------------------

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
KL = [{"name": "distillation", "divergence": "forward_kl", "temperature": 2.0}]


def lora_distill_config(out: Path) -> dict[str, Any]:
    """Forward KL to the live teacher (both heads fused), LoRA on the one-layer student's q and v
    (merged at the end too), 6 steps with a checkpoint at step 3."""
    config = distill_config(out)
    config.update(lora={**LORA, "merge": True}, loss={"terms": KL})
    config["training"].update(lr=3e-2, save_steps=3)
    return config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One distill run under LoRA (6 steps, checkpoint at 3, merge): its output folder, the trained
    student's parameters and logits on a fixed batch (before the merge), the teacher it trained
    against, and whether each fused distillation head asked for the student head's weight gradient."""
    import losslab.train.run as run_module
    import losslab.train.tasks.distill as distill_module
    from losslab.losses import fused_distillation
    from losslab.train.run import train

    out = tmp_path_factory.mktemp("distill_lora") / "run"
    seen: dict[str, Any] = {
        "out": out,
        "weight_grad": [],
        "ids": torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0)),
    }
    real_load, real_trained, real_run = (
        distill_module.load_models,
        run_module.trained_model,
        fused_distillation._DistillationHead.run,
    )

    def load_models(config: Any, *, keep_teacher: bool) -> Any:
        student, seen["teacher"] = real_load(config, keep_teacher=keep_teacher)
        return student, seen["teacher"]

    def trained_model(trainer: Any) -> torch.nn.Module:
        model = real_trained(trainer)
        if "logits" not in seen:
            seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
            with torch.no_grad():
                seen["logits"] = model.eval()(input_ids=seen["ids"]).logits
        return model

    def head_run(self: Any, tensors: Any, row_scale: Any, needs: tuple[bool, ...]) -> Any:
        if row_scale is not None:
            seen["weight_grad"].append(needs[1])
        return real_run(self, tensors, row_scale, needs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill_module, "load_models", load_models)
        patch.setattr(run_module, "trained_model", trained_model)
        patch.setattr(fused_distillation._DistillationHead, "run", head_run)
        train(TrainConfig.model_validate(lora_distill_config(out)))
    return seen


def test_a_lora_distill_run_trains_only_the_students_adapters(lora_run: dict[str, Any]) -> None:
    """The student built from the teacher gets adapters (the same prepare_policy as causal_lm);
    its base weights and the teacher end bit-identical to fresh copies; the teacher was never
    wrapped nor trained; the fused heads computed no gradient for the frozen student head."""
    import json

    from losslab.train.lora import is_peft

    from .test_lora import base_name, is_adapter

    params, teacher = lora_run["params"], lora_run["teacher"]
    assert lora_run["trainable"] and lora_run["trainable"] == {n for n in params if is_adapter(n)}
    fresh_teacher = load_causal_lm(TINY_LLAMA)
    fresh_student = dict(student_from_teacher(fresh_teacher, [0]).named_parameters())
    for name, value in params.items():
        if not is_adapter(name):
            assert torch.equal(value, fresh_student[base_name(name)]), name
    assert any(n.endswith("lora_B.default.weight") and v.abs().sum() > 0 for n, v in params.items())  # it trained
    assert not is_peft(teacher) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    fresh = dict(fresh_teacher.named_parameters())
    assert dict(teacher.named_parameters()).keys() == fresh.keys()
    assert all(torch.equal(p, fresh[n]) for n, p in teacher.named_parameters())
    summary = json.loads((lora_run["out"] / "summary.json").read_text())
    assert summary["teacher"] == "live (fused)" and "trainable of" in summary["lora"]["trainable"]
    assert lora_run["weight_grad"] and not any(lora_run["weight_grad"])  # the frozen head: no weight gradient


def test_the_saved_student_adapter_reloads_into_the_rebuilt_student(lora_run: dict[str, Any]) -> None:
    """model/ holds the adapter only (safetensors), on no named base model (the student was built
    in memory: rebuild it from the teacher); it reloads to the trained student's logits, and
    model_merged/ (lora.merge) is the merged student."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    from losslab.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGED_DIR

    from .test_lora import is_adapter

    model = lora_run["out"] / "model"
    saved = load_file(str(model / ADAPTER_WEIGHTS))
    assert saved and all(is_adapter(k) for k in saved) and not (model / "model.safetensors").exists()
    # not the teacher: PEFT would load the whole teacher under the one-layer student's adapters
    assert json.loads((model / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] in (None, "")
    ids, expected = lora_run["ids"], lora_run["logits"]
    base = student_from_teacher(load_causal_lm(TINY_LLAMA), [0]).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, str(model)).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        merged = load_causal_lm(str(lora_run["out"] / MERGED_DIR)).eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapters changed the student


def test_a_lora_distill_run_resumes_to_the_same_adapter(
    lora_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The run above, killed after its step-3 checkpoint and rerun: the same final adapter."""
    from safetensors.torch import load_file

    from losslab.train.lora import ADAPTER_WEIGHTS
    from losslab.train.run import train

    out = tmp_path / "run"
    shutil.copytree(lora_run["out"], out)
    for path in ("checkpoint-6", "model", "model_merged"):  # as if killed after the step-3 checkpoint
        shutil.rmtree(out / path)
    (out / "metrics.json").unlink()
    capsys.readouterr()
    train(TrainConfig.model_validate(lora_distill_config(out)))
    assert f"resuming from {out / 'checkpoint-3'}" in capsys.readouterr().out
    first = load_file(str(lora_run["out"] / "model" / ADAPTER_WEIGHTS))
    again = load_file(str(out / "model" / ADAPTER_WEIGHTS))
    assert again.keys() == first.keys()
    for name, value in again.items():
        torch.testing.assert_close(value, first[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("teacher_kind", ["full", "topk"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_the_fused_distillation_head_equals_the_plain_head_under_lora(
    teacher: Any, samples: list[dict], teacher_kind: str, divergence: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loss and adapter gradients of the fused heads (student head frozen: no weight gradient
    asked or made) equal the plain logits path, from the full teacher and from its top-k."""
    from losslab.losses import fused_distillation
    from losslab.losses.registry import build_composite
    from losslab.masking import PaddedCollator
    from losslab.train.adapter import LossAdapter
    from losslab.train.config import LoraConfig
    from losslab.train.lora import with_lora
    from losslab.train.next_token import NextTokenForward
    from losslab.train.tasks.distill_batches import DistillForward

    from .test_lora import is_adapter, randomised

    torch.manual_seed(0)
    student = randomised(with_lora(student_from_teacher(teacher, [0]), LoraConfig(**LORA))).train()
    head = student.get_output_embeddings()
    asked: list[bool] = []
    real_run = fused_distillation._DistillationHead.run

    def spy(self: Any, tensors: Any, row_scale: Any, needs: tuple[bool, ...]) -> Any:
        asked.append(needs[1])
        out = real_run(self, tensors, row_scale, needs)
        assert out[1][1] is None  # no weight gradient was made
        return out

    monkeypatch.setattr(fused_distillation._DistillationHead, "run", spy)
    term = {"name": "distillation", "divergence": divergence, "temperature": 2.0}
    composite = build_composite([term], total_steps=1)
    batch = DistillCollator(PaddedCollator(0), packed=False)(samples[:4])
    results = {}
    for fused in (True, False):
        mode = "topk" if teacher_kind == "topk" else "fused" if fused else "logits"
        forward = DistillForward(
            NextTokenForward(lm_head=head if fused else None, fused=fused, hidden_states=fused),
            TeacherSide(mode, teacher, 5 if teacher_kind == "topk" else None),
        )
        student.zero_grad(set_to_none=True)
        loss = LossAdapter(composite, forward, model=student, shifts_labels=True).compute_loss(student, dict(batch))
        loss.backward()
        assert head.weight.grad is None and all(p.grad is None for p in teacher.parameters())
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        assert grads and all(is_adapter(n) for n in grads)
        results[fused] = (loss.detach(), grads)
    assert asked and not any(asked)  # the fused head ran, and never for the frozen weight
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in results[True][1].values())
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_teacher_cache_entry_does_not_depend_on_the_students_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is keyed by the teacher and the data: a LoRA student and a fully trained one
    read the same entry (computed once)."""
    import functools
    import re

    import losslab.train.tasks.distill as distill_module
    from losslab.train.lora import is_peft
    from losslab.train.task import get_task, plan_loss

    monkeypatch.setattr(
        distill_module,
        "cached_teacher_topk",
        functools.partial(distill_module.cached_teacher_topk, cache_root=tmp_path / "cache", progress=False),
    )
    entries, peft = [], []
    for lora in (None, LORA):
        config = distill_config(tmp_path / "out", top_k=3, cache=True)
        config.update(lora=lora, loss={"terms": KL})
        config["data"]["max_train_samples"] = 4
        cfg = TrainConfig.model_validate({k: v for k, v in config.items() if v is not None})
        capsys.readouterr()
        run = get_task("distill").build(cfg, plan_loss(cfg))
        entries.append(re.findall(r"cache entry (\w+)", capsys.readouterr().out))
        peft.append(is_peft(run.model))
    assert peft == [False, True]
    assert entries[0] and entries[0] == entries[1]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_lora_stays_a_config_error_for_the_tasks_without_a_causal_lm(tmp_path: Path) -> None:
    from losslab.train.config import LORA_TASKS, LoraConfig
    from losslab.train.tasks import TASKS

    assert LORA_TASKS == ("causal_lm", "preference", "distill")
    flat = TrainConfig.model_validate({**distill_config(tmp_path), "lora": LORA})  # distill takes adapters,
    mapping = TrainConfig.model_validate({**distill_config(tmp_path), "model": {"name": TINY_LLAMA, "lora": LORA}})
    assert flat.lora == mapping.lora == LoraConfig(**LORA)  # in either spelling (model: the teacher, as allowed)
    others = [task for task in TASKS if task not in LORA_TASKS]
    assert others == ["sequence_classification", "token_classification", "reward_model", "embedding"]
    for task in others:
        config = train_config(tmp_path, task=task, lora=LORA)
        with pytest.raises(
            ValidationError, match=rf"LoRA adapters are for the causal-LM tasks \(.*distill\), not {task}"
        ):
            TrainConfig.model_validate(config)


def test_lora_targets_of_a_student_built_from_the_teacher_are_checked_on_the_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any data or weight: on a weightless copy of the teacher (the student's layers and
    names), not of ``model`` (unset: the default model, another one)."""
    import losslab.models
    from losslab.train.lora import check_lora

    resolved: list[str] = []
    real = losslab.models.resolve
    monkeypatch.setattr(losslab.models, "resolve", lambda name: resolved.append(name) or real(name))
    config = TrainConfig.model_validate({**lora_distill_config(tmp_path), "lora": {"target_modules": ["qkv"]}})
    with pytest.raises(UserError, match="'qkv' matches no module of LlamaForCausalLM"):
        check_lora(config)
    assert resolved == [TINY_LLAMA]
    # with the student's depth: the one-layer student has layers.0 only (the teacher has more)
    targets = {"lora": {"target_modules": ["layers.1.self_attn.q_proj"]}}
    with pytest.raises(UserError, match=r"'layers\.1\.self_attn\.q_proj' matches no module"):
        check_lora(TrainConfig.model_validate({**lora_distill_config(tmp_path), **targets}))
    check_lora(TrainConfig.model_validate({**lora_distill_config(tmp_path), "lora": {"target_modules": ["q_proj"]}}))


@pytest.mark.parametrize("top_k", [None, 5], ids=["fused", "topk"])
def test_a_lora_student_distils_from_its_own_base_without_a_second_copy(
    top_k: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``model`` == ``distill.teacher`` under LoRA: the teacher is the student with its adapters
    switched off (one model loaded), and the run equals one with a separate frozen copy of the
    same weights (the teacher named by its folder): the same per-step losses and final adapter.
    From the full teacher the divergence starts at 0 (lora_B = 0: student == base) and grows as
    the adapters train."""
    from safetensors.torch import load_file

    import losslab.train.tasks.distill_models as models_module
    from losslab.models import resolve
    from losslab.train.lora import ADAPTER_WEIGHTS
    from losslab.train.run import train

    loads: list[str] = []
    real_load = models_module.load_causal_lm

    def counted(name: str, **kwargs: Any) -> Any:
        loads.append(name)
        return real_load(name, **kwargs)

    monkeypatch.setattr(models_module, "load_causal_lm", counted)
    terms = [{"name": "token_cross_entropy"}, {"name": "distillation", "weight": 0.5, "temperature": 2.0}]
    runs = {}
    for name, teacher in (("own", TINY_LLAMA), ("copy", resolve(TINY_LLAMA))):
        config = train_config(
            tmp_path / name,
            task="distill",
            model={"name": TINY_LLAMA, "lora": LORA},
            distill={"teacher": teacher, "top_k": top_k},
            loss={"terms": terms},
            training={"max_steps": 4, "lr": 3e-2},
            validation=True,
        )
        loads.clear()
        capsys.readouterr()
        train(TrainConfig.model_validate(config))
        runs[name] = (list(loads), capsys.readouterr().out)
    assert runs["own"][0] == [TINY_LLAMA] and len(runs["copy"][0]) == 2  # student (+ teacher)
    assert "the student's own base model (its LoRA adapters switched off), no second copy" in runs["own"][1]
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert summary["teacher_model"] == f"{TINY_LLAMA} (the student's base, adapters off)"
    assert summary["teacher"] == ("live (fused)" if top_k is None else "live (topk, top 5)")

    def logged(name: str) -> list[dict]:
        rows = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        return [r for r in rows if "grad_norm" in r]

    own, copy = logged("own"), logged("copy")
    assert len(own) == len(copy) == 4
    for a, b in zip(own, copy):
        for key in ("loss", "loss/token_cross_entropy", "loss/distillation", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    if top_k is None:  # (from a top-k teacher the divergence to the full student is not 0 at the start)
        assert own[0]["loss/distillation"] < 1e-6 < own[-1]["loss/distillation"]
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("own", "copy")]
    assert 0 < metrics[0]["validation/teacher_agreement"] <= 1  # the base as the teacher in evaluation too
    for key in ("validation/teacher_agreement", "validation/loss"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-6), key
    want = load_file(str(tmp_path / "copy" / "model" / ADAPTER_WEIGHTS))
    got = load_file(str(tmp_path / "own" / "model" / ADAPTER_WEIGHTS))
    assert got.keys() == want.keys()
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-7, msg=key)


def test_the_students_own_base_as_live_teacher_is_refused_under_fsdp(tmp_path: Path) -> None:
    """Its adapters-off forward would run outside the sharded model: a config error that says
    what to do, before any work; from the cache (computed before training) it is allowed."""
    from losslab.config import validate
    from losslab.errors import UserError

    fields = {"task": "distill", "model": {"name": TINY_LLAMA, "lora": LORA}, "training": {"fsdp": True}}
    with pytest.raises(UserError, match=r"own base as the live teacher .* needs training\.fsdp: false"):
        validate(TrainConfig, train_config(tmp_path, **fields, distill={"teacher": TINY_LLAMA}), source="x.yaml")
    cached = {"teacher": TINY_LLAMA, "top_k": 5, "cache": True}
    assert validate(TrainConfig, train_config(tmp_path, **fields, distill=cached), source="x.yaml").training.fsdp
