"""build_samples_parallel (datasets.map, num_proc=2, cached) == build_samples (one process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from losslab.data import records
from losslab.errors import UserError
from losslab.masking import parallel, strategy
from losslab.masking.build import BuildStats, MaskBuilder, MaskConfig, build_samples
from losslab.masking.parallel import build_samples_parallel

from ..conftest import train_config


def chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]}


def write_records(path: Path) -> Path:
    lines = [
        json.dumps(chat("hi", "hello there", "how are you?", "fine, thanks")),
        '{"messages": [ broken',  # invalid JSON (main process)
        json.dumps(chat("one turn", "one reply")),
        json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),  # UserError in a worker (encode)
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),  # validation error (worker)
        json.dumps([1, 2]),  # not an object
        "",
        json.dumps({"messages": [{"role": "system", "content": "be brief"}, *chat("q", "a " * 40)["messages"]]}),
        json.dumps(chat("last", "reply <b>", "more", "")),  # empty last reply
    ] + [json.dumps(chat(f"question {i}", f"answer {i} " * (i % 7 + 1))) for i in range(12)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def reference(path: Path, tokenizer, config: MaskConfig, limit: int | None = None) -> tuple[list[dict], BuildStats]:
    stats = BuildStats()
    return build_samples(path, tokenizer, config, stats=stats, limit=limit), stats


@pytest.mark.parametrize(
    ("strategy", "limit"), [("concat", None), ("expand", None), ("expand", 1), ("concat", 3), ("expand", 9)]
)
def test_same_samples_masks_and_counts_as_one_process(tmp_path, smollm2_tokenizer, strategy, limit):
    path = write_records(tmp_path / "train.jsonl")
    config = MaskConfig(on_error="skip", strategy=strategy, max_length=48)
    want, want_stats = reference(path, smollm2_tokenizer, config, limit)
    stats = BuildStats()
    got = build_samples_parallel(
        path, smollm2_tokenizer, config, num_proc=2, stats=stats, limit=limit, cache=tmp_path / "cache", batch_size=4
    )
    assert got == want
    assert stats.summary() == want_stats.summary()
    assert stats.skipped == want_stats.skipped  # same count and same messages (file:line), same order
    assert want_stats.skipped.count == {1: 1}.get(limit, 4)  # lines 2, 4 (a worker), 5, 6; limit 1 stops at line 3


def test_bad_record_in_a_worker_raises_the_same_user_error(tmp_path, smollm2_tokenizer):
    path = write_records(tmp_path / "train.jsonl")
    lines = path.read_text().splitlines()
    del lines[1]  # without the broken JSON, the first error is the user-only chat: found in a worker
    path.write_text("\n".join(lines) + "\n")
    config = MaskConfig()
    with pytest.raises(UserError) as want:
        build_samples(path, smollm2_tokenizer, config)
    with pytest.raises(UserError) as got:
        build_samples_parallel(path, smollm2_tokenizer, config, num_proc=2, cache=tmp_path / "cache", batch_size=2)
    assert str(got.value) == str(want.value)
    assert f"{path}:3:" in str(got.value) and "no assistant turn" in str(got.value)


def test_second_run_reuses_the_cache_and_a_changed_input_rebuilds(tmp_path, smollm2_tokenizer, monkeypatch):
    path = write_records(tmp_path / "train.jsonl")
    config = MaskConfig(on_error="skip")
    first = build_samples_parallel(path, smollm2_tokenizer, config, num_proc=2, cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(parallel, "_encode_batch", fail)
    stats = BuildStats()
    assert (
        build_samples_parallel(path, smollm2_tokenizer, config, num_proc=2, cache=tmp_path / "cache", stats=stats)
        == first
    )
    assert stats.summary() == reference(path, smollm2_tokenizer, config)[1].summary()
    with pytest.raises(AssertionError, match="encoded again"):  # another mask config: another fingerprint
        build_samples_parallel(
            path, smollm2_tokenizer, MaskConfig(on_error="skip", max_length=16), num_proc=1, cache=tmp_path / "cache"
        )
    with path.open("a") as fh:  # another file content: another fingerprint
        fh.write(json.dumps(chat("new", "record")) + "\n")
    with pytest.raises(AssertionError, match="encoded again"):
        build_samples_parallel(path, smollm2_tokenizer, config, num_proc=1, cache=tmp_path / "cache")


def test_causal_lm_data_num_proc_gives_the_same_training_data(tmp_path, monkeypatch):
    from losslab.train.config import TrainConfig
    from losslab.train.task import plan_loss
    from losslab.train.tasks import causal_lm

    monkeypatch.setattr(parallel, "prepared_dir", lambda: tmp_path / "prepared")
    cfg = train_config(
        tmp_path / "run",
        validation=True,
        data={"max_length": 64, "max_train_samples": 20, "max_eval_samples": 5},
        loss=None,
        training=None,
        eval=None,
    )
    config = TrainConfig.model_validate(cfg)
    one = causal_lm.build(config, plan_loss(config))
    cfg["data"]["num_proc"] = 2
    config = TrainConfig.model_validate(cfg)
    two = causal_lm.build(config, plan_loss(config))
    assert two.train == one.train and two.validation == one.validation and two.summary == one.summary
    assert len(list((tmp_path / "prepared").iterdir())) == 2  # train and validation


def test_num_proc_is_refused_for_tasks_that_do_not_use_it(tmp_path):
    from losslab.config import load_config
    from losslab.train.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text(
        "task: sequence_classification\noutput_dir: out\ndata:\n  train: builtin:sentiment\n  num_proc: 2\n"
    )
    with pytest.raises(UserError, match="num_proc > 1 is for causal_lm"):
        load_config(TrainConfig, path)


def test_parquet_values_json_cannot_hold_are_judged_like_one_process(tmp_path, smollm2_tokenizer):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    created = [datetime.datetime(2024, 1, 1), datetime.datetime(2024, 1, 2)]
    pq.write_table(pa.table({"instruction": ["say hi", "say bye"], "output": ["hi", "bye"], "created": created}), path)
    config = MaskConfig(on_error="skip")
    want_samples, want = reference(path, smollm2_tokenizer, config)
    stats = BuildStats()
    got = build_samples_parallel(path, smollm2_tokenizer, config, num_proc=2, cache=tmp_path / "cache", stats=stats)
    assert got == want_samples == [] and stats.summary() == want.summary()
    assert stats.skipped.examples == [
        f"{path}:1: field 'created': Extra inputs are not permitted",
        f"{path}:2: field 'created': Extra inputs are not permitted",
    ]


def test_a_template_file_is_fingerprinted_by_its_contents_also_under_home(tmp_path, smollm2_tokenizer, monkeypatch):
    from losslab.paths import cache_dir

    # the caches stay where they are: a model materialised now must not land in (and fill) this folder
    monkeypatch.setenv("LOSSLAB_CACHE", str(cache_dir()))
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write_records(tmp_path / "train.jsonl")
    template = tmp_path / "t.jinja"
    for tag in ("A", "B"):  # same path, edited file: the second build must not reuse the first's cache
        template.write_text("{% for m in messages %}" + tag + "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
        config = MaskConfig(template="~/t.jinja", on_error="skip")
        got = build_samples_parallel(path, smollm2_tokenizer, config, num_proc=1, cache=tmp_path / "cache")
        assert got == reference(path, smollm2_tokenizer, config)[0]
        assert smollm2_tokenizer.decode(got[0]["input_ids"]).startswith(f"{tag}user")


def test_special_token_text_is_reported_as_by_one_process(tmp_path, smollm2_tokenizer):
    path = tmp_path / "train.jsonl"
    mention = chat("How do turns end?", "With <|im_end|>.")
    path.write_text("\n".join(json.dumps(r) for r in (chat("hi", "hello"), mention, mention)) + "\n")
    want, want_stats = reference(path, smollm2_tokenizer, MaskConfig())
    stats = BuildStats()
    assert (
        build_samples_parallel(path, smollm2_tokenizer, MaskConfig(), num_proc=1, stats=stats, cache=tmp_path / "cache")
        == want
    )
    assert stats.control == want_stats.control and stats.control.count == 2
    assert stats.summary() == want_stats.summary() and f"(first: {path}:2, '<|im_end|>')" in stats.summary()


def test_the_fingerprint_covers_the_code_that_builds_the_samples(tmp_path, smollm2_tokenizer, monkeypatch):
    """A fix to the masking code in a development install keeps the version number: the cache
    key must change all the same, or stale samples would be served."""
    files = parallel.code_files()
    for module in (parallel, strategy, records):
        assert Path(module.__file__) in files
    path = write_records(tmp_path / "train.jsonl")
    builder = MaskBuilder(smollm2_tokenizer)
    source = tmp_path / "strategy.py"
    source.write_text("RULE = 1\n")
    monkeypatch.setattr(parallel, "code_files", lambda: [source])
    parallel.code_digest.cache_clear()
    try:
        before = parallel.fingerprint(path, builder, "ChatRecord", None)
        source.write_text("RULE = 2\n")  # an edited source file, in another process
        parallel.code_digest.cache_clear()
        assert parallel.fingerprint(path, builder, "ChatRecord", None) != before
    finally:
        parallel.code_digest.cache_clear()


def test_entries_unused_for_a_month_are_deleted_when_new_data_are_prepared(tmp_path, smollm2_tokenizer):
    """A hit marks its entry as used; a new entry deletes those unused for KEEP_DAYS days and
    the temporary folders of saves killed more than a day ago, and nothing else."""
    import os
    import time

    cache = tmp_path / "cache"
    path = write_records(tmp_path / "train.jsonl")
    config = MaskConfig(on_error="skip")
    build_samples_parallel(path, smollm2_tokenizer, config, num_proc=1, cache=cache)
    (used,) = list(cache.iterdir())
    day = 86400.0
    now = time.time()

    def aged(name: str, days: float) -> Path:
        entry = cache / name
        entry.mkdir(exist_ok=True)
        os.utime(entry, (now - days * day, now - days * day))
        return entry

    old, recent = aged("0" * 32, parallel.KEEP_DAYS + 1), aged("1" * 32, parallel.KEEP_DAYS - 1)
    killed_old, killed_new = aged("." + "2" * 32 + "-abc", 2), aged("." + "3" * 32 + "-def", 0.5)
    foreign = [aged(name, 400) for name in (".git", "checkpoints", "a" * 31, "." + "4" * 31 + "-x")]  # not losslab's
    os.utime(used, (now - 40 * day, now - 40 * day))
    build_samples_parallel(path, smollm2_tokenizer, config, num_proc=1, cache=cache)  # a hit: marks it used
    assert time.time() - used.stat().st_mtime < day
    with path.open("a") as fh:  # new data: a new entry, and the pruning
        fh.write(json.dumps(chat("new", "record")) + "\n")
    build_samples_parallel(path, smollm2_tokenizer, config, num_proc=1, cache=cache)
    left = {p.name for p in cache.iterdir()}
    assert used.name in left and recent.name in left and killed_new.name in left
    assert {p.name for p in foreign} <= left  # a cache= folder shared with other files loses nothing else
    assert old.name not in left and killed_old.name not in left
    assert len(left) == 4 + len(foreign) and not any(name.startswith(".deleting-") for name in left)
