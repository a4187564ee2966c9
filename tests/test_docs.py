"""The parameter manual cannot drift: every option has a help text, docs/parameters.md and the table in
docs/memory.md are what the code generates now, the Chinese page names every option, and a newly registered
stage shows up by itself."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers import TrainingArguments

from medgpt.arguments import documented
from medgpt.docs import (
    MEMORY,
    PARAMETERS,
    PARAMETERS_ZH,
    REGENERATE,
    missing_translations,
    render_memory,
    render_parameters,
    sections,
    undocumented,
)
from medgpt.stages import STAGES, Stage, load_stages


@pytest.fixture(scope="module")
def manual():
    return sections()


def test_every_option_has_a_help_text(manual):
    missing = undocumented(manual)
    assert not missing, "options without a help text (add one where the field or flag is defined):\n  " \
        + "\n  ".join(missing)


def test_parameters_page_is_current(manual):
    assert PARAMETERS.read_text(encoding="utf-8") == render_parameters(manual), \
        f"docs/parameters.md is stale: regenerate it with `{REGENERATE}`"


def test_memory_table_is_current():
    current = MEMORY.read_text(encoding="utf-8")
    assert current == render_memory(current), f"the table in docs/memory.md is stale: regenerate it with `{REGENERATE}`"


def test_chinese_page_names_every_option(manual):
    missing = missing_translations(manual, PARAMETERS_ZH.read_text(encoding="utf-8"))
    listing = "\n".join(f"  {title}: {', '.join(names)}" for title, names in missing.items())
    assert not missing, f"docs/parameters_zh.md lacks a line (with the name in backticks) for:\n{listing}"


def test_page_covers_every_stage_and_the_options_users_touch(manual):
    titles = [section.title for section in manual]
    assert all(f"Stage `{name}`" in titles for name in load_stages())
    names = {option.name for section in manual for option in section.options}
    assert {"torch_dtype", "lora_rank", "learning_rate", "per_device_train_batch_size", "max_length", "bf16",
            "--max-new-tokens", "--gpu"} <= names
    assert "medgpt sft --help" in render_parameters(manual)


def test_a_newly_registered_stage_appears_with_its_options_and_missing_help_is_reported(monkeypatch):
    @dataclass
    class ToyArguments:
        """Options of a toy stage."""

        toy_strength: float = documented("How hard the toy pulls.", default=0.5)
        toy_silent: int = 3

    load_stages()
    monkeypatch.setitem(STAGES, "toy", Stage("toy", "a toy stage", lambda config: {}, TrainingArguments,
                                             (ToyArguments,)))
    manual = sections()
    toy = next(section for section in manual if section.title == "Stage `toy`")
    assert [(o.name, o.default, o.help) for o in toy.options] == [("toy_strength", "0.5", "How hard the toy pulls."),
                                                                   ("toy_silent", "3", "")]
    assert "ToyArguments.toy_silent (toy_silent)" in undocumented(manual)
    assert missing_translations(manual, "`toy_strength`")["Stage `toy`"] == ["toy_silent"]
