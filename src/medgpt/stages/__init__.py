"""The registry of training stages: each stage module registers one `Stage`; the CLI and pipeline read it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line for `medgpt --help`
    run: Callable[[Any], dict]  # RunConfig -> final metrics
    training_class: type  # the transformers / TRL config class holding the trainer options
    extra_classes: tuple[type, ...] = ()  # stage-specific option sections
    data_kind: str = "conversation"  # record kind the stage reads (see medgpt.data.records.KINDS)


STAGES: dict[str, Stage] = {}

# Stage modules, imported on first use; each calls `register`. Later stages add their module here.
STAGE_MODULES: tuple[str, ...] = (
    "medgpt.stages.pt",
    "medgpt.stages.sft",
    "medgpt.stages.rm",
    "medgpt.stages.dpo",
    "medgpt.stages.kto",
    "medgpt.stages.grpo",
    "medgpt.stages.distill",
    "medgpt.stages.ppo",
)


def register(stage: Stage) -> Stage:
    if stage.name in STAGES:
        raise ValueError(f"stage '{stage.name}' is registered twice")
    STAGES[stage.name] = stage
    return stage


def load_stages() -> dict[str, Stage]:
    """Every stage, in the order of STAGE_MODULES whichever module was imported first (then any other)."""
    for module in STAGE_MODULES:
        importlib.import_module(module)

    def position(stage: Stage) -> int:
        module = getattr(stage.run, "__module__", "")
        return STAGE_MODULES.index(module) if module in STAGE_MODULES else len(STAGE_MODULES)

    return {s.name: s for s in sorted(STAGES.values(), key=position)}  # stable: a module's own order stays


def get_stage(name: str) -> Stage:
    stages = load_stages()
    if name not in stages:
        known = ", ".join(sorted(stages)) or "none yet"
        raise KeyError(f"unknown stage '{name}' (available: {known})")
    return stages[name]
