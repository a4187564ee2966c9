"""The example configs: every option name exists; the CPU ones build completely."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from medgpt.config import build_config, check_names, read_yaml
from medgpt.stages import get_stage

PIPELINES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "\nstages:" in p.read_text())
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p not in PIPELINES)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_uses_only_known_options(path: Path):
    values = read_yaml(path)
    check_names(get_stage(values["stage"]), values)


@pytest.mark.parametrize("path", [p for p in CONFIGS if "qwen" not in p.name], ids=lambda p: p.name)
def test_cpu_example_config_builds(path: Path):
    values = read_yaml(path)
    config = build_config(get_stage(values["stage"]), values)
    assert config.model.model_name_or_path == "smollm2-135m"
    for spec in str(config.data.train_file_dir).split(","):
        assert (ROOT / spec).exists()


def test_deepspeed_and_accelerate_examples_parse():
    import json

    import yaml

    for path in (ROOT / "configs" / "deepspeed").glob("*.json"):
        assert json.loads(path.read_text())["zero_optimization"]["stage"] in (1, 2, 3)
    for path in (ROOT / "configs" / "accelerate").glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["distributed_type"]


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_example_pipelines_load_with_every_stage_config_built(path: Path, monkeypatch):
    from medgpt.pipeline import load_pipeline

    monkeypatch.chdir(ROOT)
    pipeline = load_pipeline(path.relative_to(ROOT))
    assert len(pipeline.stages) >= 4 and pipeline.evaluation
