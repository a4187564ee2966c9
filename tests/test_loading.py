"""Stage data: validation before training, splits, caps, hub datasets and lazy streaming."""

from __future__ import annotations

import json

import pytest

from medgpt.arguments import DataArguments
from medgpt.data.loading import load_stage_data, stream_records
from medgpt.data.records import Conversation, InvalidDataError


def write_sharegpt(path, n, bad_lines=()):
    lines = []
    for i in range(1, n + 1):
        if i in bad_lines:
            lines.append(json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": ""}]}))
        else:
            lines.append(json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    data = write_sharegpt(tmp_path / "d.jsonl", 40)
    args = DataArguments(train_file_dir=str(data), validation_split_percentage=25)
    first, second = load_stage_data(args, ("conversation",)), load_stage_data(args, ("conversation",))
    assert len(first.eval) == 10 and len(first.train) == 30
    assert [r.source.line for r in first.eval] == [r.source.line for r in second.eval]
    assert not {r.source.line for r in first.eval} & {r.source.line for r in first.train}


def test_validation_files_and_caps(tmp_path):
    train = write_sharegpt(tmp_path / "train.jsonl", 20)
    valid = write_sharegpt(tmp_path / "valid.jsonl", 8)
    data = load_stage_data(DataArguments(train_file_dir=str(train), validation_file_dir=str(valid),
                                         max_train_samples=5, max_eval_samples=3), ("conversation",))
    assert len(data.train) == 5 and len(data.eval) == 3
    assert all(isinstance(r, Conversation) for r in data.train)


def test_invalid_records_refuse_training_unless_skipped(tmp_path):
    data = write_sharegpt(tmp_path / "d.jsonl", 10, bad_lines=(3, 7))
    with pytest.raises(InvalidDataError, match=r"d.jsonl:3: conversations\[1\]: empty assistant turn"):
        load_stage_data(DataArguments(train_file_dir=str(data)), ("conversation",))
    kept = load_stage_data(DataArguments(train_file_dir=str(data), skip_invalid_records=True), ("conversation",))
    assert len(kept.train) == 8 and kept.skipped == 2


def test_wrong_kind_for_the_stage_is_refused_even_when_skipping(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(InvalidDataError, match="conversation records are needed"):
        load_stage_data(DataArguments(train_file_dir=str(data), skip_invalid_records=True), ("conversation",))


def test_hub_dataset_reads_through_load_dataset(tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    write_sharegpt(folder / "train.jsonl", 6)
    data = load_stage_data(DataArguments(dataset_name=str(folder)), ("conversation",))
    assert len(data.train) == 6
    assert str(data.train[0].source).endswith(":row 1")


def test_streaming_is_lazy(tmp_path):
    # Line 3 is broken: taking two records must not reach it, taking more must name it.
    data = write_sharegpt(tmp_path / "big.jsonl", 5, bad_lines=(3,))
    stream = stream_records(DataArguments(train_file_dir=str(data), streaming=True), ("conversation",))
    assert [next(stream).messages[0].content for _ in range(2)] == ["q1", "q2"]
    with pytest.raises(InvalidDataError, match="big.jsonl:3"):
        next(stream)


def test_streaming_skips_invalid_records_when_asked_and_honours_the_cap(tmp_path):
    data = write_sharegpt(tmp_path / "big.jsonl", 6, bad_lines=(2,))
    args = DataArguments(train_file_dir=str(data), streaming=True, skip_invalid_records=True, max_train_samples=4)
    assert [r.messages[0].content for r in stream_records(args, ("conversation",))] == ["q1", "q3", "q4", "q5"]


def test_train_shards_split_the_training_records_into_disjoint_parts(tmp_path):
    # Two reward models on 1/2 and 2/2 see disjoint halves; the validation records are held out of both.
    data = write_sharegpt(tmp_path / "d.jsonl", 21)
    shards = [load_stage_data(DataArguments(train_file_dir=str(data), validation_split_percentage=20,
                                            train_shard=f"{k}/2"), ("conversation",)) for k in (1, 2)]
    lines = [{r.source.line for r in shard.train} for shard in shards]
    assert not lines[0] & lines[1] and len(lines[0]) == 9 and len(lines[1]) == 8
    assert lines[0] | lines[1] == set(range(1, 22)) - {r.source.line for r in shards[0].eval}
    assert [r.source.line for r in shards[0].eval] == [r.source.line for r in shards[1].eval]
    args = DataArguments(train_file_dir=str(data), streaming=True, train_shard="2/3")
    streamed = stream_records(args, ("conversation",))
    assert [r.messages[0].content for r in streamed] == [f"q{i}" for i in range(2, 22, 3)]
