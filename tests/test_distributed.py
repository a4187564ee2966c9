"""Engine detection and the code paths sharding changes, in one process: what train_results.json records, what the
launcher's environment requests, ZeRO-3 partitions (shape [0]) counted and never resized, weights checked on disk
before a run is marked complete, and device_map overridden under a distributed launch."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from medgpt.arguments import ModelArguments
from medgpt.config import ConfigError
from medgpt.models.adapters import count_parameters
from medgpt.training.distributed import live_engine, requested_engine
from medgpt.training.recipe import resize_for_tokenizer
from medgpt.training.weights import check_deepspeed_config, check_weights_saved

pytestmark = pytest.mark.usefixtures("private_cache")


def state(kind: str, processes: int):
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType[kind], num_processes=processes)


@pytest.mark.parametrize("kind, processes, name", [
    ("NO", 1, "single"), ("MULTI_CPU", 1, "single"), ("MULTI_CPU", 2, "ddp"), ("MULTI_GPU", 8, "ddp"),
    ("FSDP", 8, "fsdp"),
])
def test_live_engine_names_what_runs(kind, processes, name):
    assert live_engine(SimpleNamespace(state=state(kind, processes))) == {"distributed_type": name,
                                                                          "world_size": processes}


def test_live_engine_reads_a_partial_state_as_ppo_has_one():
    from accelerate.state import PartialState

    engine = live_engine(PartialState())
    assert engine == {"distributed_type": "single", "world_size": 1}


def test_requested_engine_follows_the_launcher_and_the_options(monkeypatch):
    args = SimpleNamespace(deepspeed=None, fsdp_plugin_args=None)
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert requested_engine(args) == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert requested_engine(args) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert requested_engine(args) == "fsdp"
    assert requested_engine(SimpleNamespace(deepspeed="configs/deepspeed/zero3.json", fsdp_plugin_args=None)) == \
        "deepspeed"


def test_one_process_on_cpu_refuses_deepspeed_and_says_fsdp_runs_alone(monkeypatch, caplog):
    from medgpt.training.distributed import configure_engine

    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="DeepSpeed on CPU needs a multi-process launch"):
        configure_engine(SimpleNamespace(deepspeed="configs/deepspeed/zero3.json", fsdp_plugin_args=None))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = SimpleNamespace(deepspeed=None, fsdp_plugin_args={"fsdp_version": 2}, world_size=1)
    with caplog.at_level(logging.WARNING):
        configure_engine(args)
    assert "FSDP with one process on CPU" in caplog.text and args.fsdp_plugin_args is None


class Partitioned(torch.nn.Module):
    """What a ZeRO-3 model looks like on each process: every parameter has shape [0], its size in ds_*."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embed = torch.nn.Embedding(rows, dim)
        for param in self.parameters():
            param.ds_shape, param.ds_numel = param.shape, param.numel()
            param.data = torch.empty(0)

    def get_input_embeddings(self):
        return self.embed

    def resize_token_embeddings(self, *args, **kwargs):
        raise AssertionError("a partitioned embedding must not be resized")


def test_zero3_partitions_are_counted_by_their_real_size_and_not_resized(tokenizer):
    model = Partitioned(len(tokenizer), 8)
    assert model.embed.weight.shape == (0,)
    assert count_parameters(model) == (len(tokenizer) * 8, len(tokenizer) * 8)
    assert resize_for_tokenizer(model, tokenizer) is False


def test_zero3_without_gathering_weights_at_save_is_refused_before_training():
    config = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}
    args = SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=config))
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save"):
        check_deepspeed_config(args)
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    check_deepspeed_config(args)
    shipped = json.loads((pytest.importorskip("pathlib").Path(__file__).parents[1] / "configs/deepspeed/zero3.json")
                         .read_text())
    check_deepspeed_config(SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=shipped)))


def test_weights_check_refuses_a_directory_without_weights_or_with_shards(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="no weights were written"):
        check_weights_saved(tmp_path)
    save_file({"w": torch.zeros(0)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="shape \\[0\\]"):
        check_weights_saved(tmp_path)
    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "model.safetensors"))
    assert check_weights_saved(tmp_path) == ["model.safetensors"]
    (tmp_path / "model.safetensors").unlink()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    with pytest.raises(RuntimeError, match="not written: model-00002-of-00002"):
        check_weights_saved(tmp_path)


def test_a_run_whose_save_wrote_no_weights_fails_and_is_not_marked_complete(tmp_path, tiny_model_dir, monkeypatch):
    """What FSDP's SHARDED_STATE_DICT did through Trainer.save_model: nothing written, no error."""
    import medgpt.training.recipe as recipe
    from medgpt.config import build_config
    from medgpt.stages import get_stage

    monkeypatch.setattr(recipe, "save_full_weights", lambda trainer, directory: directory.mkdir(exist_ok=True))
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi?"},
                                                  {"from": "gpt", "value": "Hello."}]}) + "\n")
    spec = get_stage("sft")
    config = build_config(spec, {"model_name_or_path": str(tiny_model_dir), "train_file_dir": str(data),
                                 "output_dir": str(tmp_path / "out"), "max_steps": 1, "report_to": "none", "max_length": 128,
                                 "save_steps": 100})
    with pytest.raises(RuntimeError, match="no weights were written"):
        spec.run(config)
    assert not (tmp_path / "out" / "train_results.json").exists()


def test_device_map_under_a_distributed_launch_becomes_the_local_device(tiny_model_dir, monkeypatch, caplog):
    from medgpt.models.load import load_model

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with caplog.at_level(logging.INFO):
        model = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir), device_map="auto"))
    assert "device_map 'auto' replaced by" in caplog.text
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert getattr(model, "hf_device_map", {"": "cpu"}) in ({"": "cpu"}, {"": torch.device("cpu")})
