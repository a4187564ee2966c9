"""Every option a stage accepts has an effect, or is refused with the reason: found in the code, not listed by hand.

Four ways an option can be accepted and do nothing, each checked for every stage in the registry (so options
and stages added later are checked too):
- one of our own fields (ModelArguments, DataArguments, AdapterArguments, RunArguments, a stage's extras) that no
  code reads: implement it, limit it to the stages that read it (`documented(stages=…)`), or refuse it;
- a trainer option transformers documents as "not directly used by Trainer" (do_train, do_eval, …), which
  only a training script can honour: medgpt must read it, or fix it in `config.FIXED_OPTIONS`;
- a trainer option that only upstream methods read which our Trainer subclasses override without calling them;
- a trainer option medgpt overwrites on the arguments object (e.g. `args.remove_unused_columns = False`).
The last two must be in FIXED_OPTIONS (the value the stage runs with and why), or be read by our code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest

from medgpt.arguments import option_stages
from medgpt.config import ANY_STAGE, FIXED_OPTIONS, OWN_SECTIONS, UPSTREAM_RENAMES, build_config, stage_option_names
from medgpt.stages import load_stages

SOURCE = Path(__file__).resolve().parents[1] / "src" / "medgpt"
# Modules that describe options rather than use them.
DESCRIBING = {"arguments.py", "docs.py"}


def medgpt_modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(encoding="utf-8")) for path in SOURCE.rglob("*.py")}


def attribute_reads(tree: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)}


@pytest.fixture(scope="module")
def read_in_medgpt() -> set[str]:
    """Every attribute name medgpt's code reads (`x.name`), outside the modules that only describe options."""
    return set().union(*(attribute_reads(tree) for path, tree in medgpt_modules().items()
                         if path.name not in DESCRIBING))


def fixed(name: str, stage: str) -> bool:
    rules = FIXED_OPTIONS.get(name, {})
    return stage in rules or ANY_STAGE in rules


def own_classes(stage) -> list[type]:
    return [*OWN_SECTIONS, *stage.extra_classes]


# ------------------------------------------------------------------------------------------------ our fields


def test_every_own_option_a_stage_accepts_is_read_or_refused(read_in_medgpt):
    idle = []
    for stage in load_stages().values():
        for cls in own_classes(stage):
            for f in dataclasses.fields(cls):
                applies = option_stages(f) is None or stage.name in option_stages(f)
                if f.init and applies and f.name not in read_in_medgpt and not fixed(f.name, stage.name):
                    idle.append(f"{stage.name}: {cls.__name__}.{f.name}")
    assert not idle, ("accepted but read nowhere (implement, limit with documented(stages=…), or refuse in "
                      "config.FIXED_OPTIONS): " + ", ".join(idle))


def test_stage_limits_name_registered_stages_and_are_enforced():
    stages = load_stages()
    for cls in {c for s in stages.values() for c in own_classes(s)}:
        for f in dataclasses.fields(cls):
            for name in option_stages(f) or ():
                assert name in stages, f"{cls.__name__}.{f.name} names unknown stage {name}"
    for stage in stages.values():
        accepted = set(stage_option_names(stage))
        for f in dataclasses.fields(OWN_SECTIONS[1]):  # DataArguments holds most stage-limited options
            limited = option_stages(f)
            if limited is not None:
                assert (f.name in accepted) == (stage.name in limited or any(
                    f.name in {g.name for g in dataclasses.fields(c)} for c in (*stage.extra_classes,
                                                                                 stage.training_class))), f.name


# ------------------------------------------------------------------------------------------------ upstream


def script_only_fields(cls: type) -> set[str]:
    """Fields whose upstream documentation says the Trainer does not use them (left to training scripts)."""
    found = set()
    for klass in cls.__mro__:
        lines = (inspect.getdoc(klass) or "").splitlines()
        for i, line in enumerate(lines):
            match = re.match(r"^(\s*)(\w+) \(`", line)
            if not match:
                continue
            indent, block = len(match.group(1)), []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following)
            if "not directly used by" in " ".join(" ".join(block).split()):
                found.add(match.group(2))
    return found & {f.name for f in dataclasses.fields(cls)}


def test_upstream_options_left_to_training_scripts_are_honoured_or_refused(read_in_medgpt):
    from transformers import TrainingArguments

    assert {"do_train", "do_eval", "do_predict", "resume_from_checkpoint"} <= script_only_fields(TrainingArguments)
    idle = [f"{stage.name}: {name}" for stage in load_stages().values()
            for name in sorted(script_only_fields(stage.training_class))
            if name not in read_in_medgpt and not fixed(name, stage.name)]
    assert not idle, "left to scripts by transformers, ignored by medgpt: " + ", ".join(idle)


def _function_reads(function) -> tuple[set[str], dict[str, set[str]]]:
    """(attribute names read directly, {self.attribute: names it is computed from}) in a function's source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return set(), {}
    derived: dict[str, set[str]] = {}
    inside: set[int] = set()

    def derive(names: list[str], expression: ast.AST) -> None:
        inside.update(id(n) for n in ast.walk(expression))
        for name in names:
            derived.setdefault(name, set()).update(attribute_reads(expression))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            names = _self_targets(node)
            if names:
                derive(names, node.value)
        elif isinstance(node, ast.If):  # `if args.x: self.y = …`: the test decides y too
            names = [name for child in [*node.body, *node.orelse] for sub in ast.walk(child)
                     if isinstance(sub, (ast.Assign, ast.AnnAssign)) for name in _self_targets(sub)]
            if names:
                derive(names, node.test)
    direct = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)
              and id(n) not in inside}
    return direct, derived


def _self_targets(node) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [t.attr for t in targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
            and t.value.id == "self"]


def _calls_super(function, name: str) -> bool:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return any(isinstance(n, ast.Attribute) and n.attr == name and isinstance(n.value, ast.Call)
               and getattr(n.value.func, "id", None) == "super" for n in ast.walk(tree))


def bypassed_fields(trainer: type, fields: set[str]) -> tuple[set[str], set[str]]:
    """(config fields only the upstream methods that `trainer` replaces read, names our replacements read)."""
    ours = [k for k in trainer.__mro__ if k.__module__.startswith("medgpt")]
    upstream = [k for k in trainer.__mro__ if not k.__module__.startswith("medgpt") and k is not object]
    replaced = {name: fn for k in reversed(ours) for name, fn in vars(k).items()
                if inspect.isfunction(fn) and not _calls_super(fn, name)}
    kept, lost, derived = set(), set(), {}
    for klass in upstream:
        for name, fn in vars(klass).items():
            if inspect.isfunction(fn):
                direct, computed = _function_reads(fn)
                (lost if name in replaced else kept).update(direct)
                for attribute, sources in computed.items():
                    derived.setdefault(attribute, set()).update(sources & fields)
    def effective(reads: set[str]) -> set[str]:
        return (reads & fields) | {f for attribute in reads for f in derived.get(attribute, ())}
    getters = [fn.fget for k in ours for fn in vars(k).values() if isinstance(fn, property) and fn.fget]
    our_reads = set().union(*(_function_reads(fn)[0] for fn in [*replaced.values(), *getters]))
    return effective(lost) - effective(kept), our_reads


def stage_trainers(stage) -> set[type]:
    """medgpt Trainer subclasses a stage's module uses, directly or through the medgpt functions it imports."""
    from transformers import Trainer

    module = sys.modules[stage.run.__module__]
    spaces = [vars(module)] + [vars(sys.modules[v.__module__]) for v in vars(module).values()
                               if callable(v) and getattr(v, "__module__", "").startswith("medgpt.")]
    return {v for space in spaces for v in space.values() if isinstance(v, type) and issubclass(v, Trainer)
            and v.__module__.startswith("medgpt")}


def test_trainer_options_our_trainer_overrides_stop_reading_are_refused():
    idle = []
    for stage in load_stages().values():
        fields = {f.name for f in dataclasses.fields(stage.training_class)}
        for trainer in stage_trainers(stage):
            lost, ours = bypassed_fields(trainer, fields)
            idle += [f"{stage.name}: {name} ({trainer.__name__})" for name in sorted(lost)
                     if name not in ours and not fixed(name, stage.name)]
    assert not idle, "read only by upstream methods our trainers replace (refuse in FIXED_OPTIONS): " + ", ".join(idle)


def test_the_override_scan_finds_what_it_must():
    # RewardTrainer replaces compute_loss, the only user of label smoothing; KTO replaces dataset preparation
    from trl import KTOConfig
    from transformers import TrainingArguments

    from medgpt.stages.kto import KTOFeaturesTrainer
    from medgpt.stages.rm import RewardTrainer

    assert "label_smoothing_factor" in bypassed_fields(RewardTrainer, {f.name for f in dataclasses.fields(
        TrainingArguments)})[0]
    assert "dataset_num_proc" in bypassed_fields(KTOFeaturesTrainer, {f.name for f in dataclasses.fields(KTOConfig)})[0]


def overwritten_upstream_fields(upstream: set[str]) -> dict[str, list[str]]:
    """{field: [file:line]} where medgpt assigns `x.field = …` in a function that never reads `field` (nor its old
    name), i.e. throws the user's value away."""
    renamed_from = {new: old for old, new in UPSTREAM_RENAMES.items()}
    found: dict[str, list[str]] = {}
    for path, tree in medgpt_modules().items():
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            # a function that reads the option, or looks its name up (`"x" in config.given`), keeps the user's value
            consulted = attribute_reads(function) | {n.value for n in ast.walk(function)
                                                     if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            for node in ast.walk(function):
                if not isinstance(node, ast.Assign):
                    continue
                for target in node.targets:
                    for element in (target.elts if isinstance(target, ast.Tuple) else [target]):
                        name = getattr(element, "attr", None)
                        if (name in upstream and _is_training_arguments(element.value) and name not in consulted
                                and renamed_from.get(name) not in consulted):
                            found.setdefault(name, []).append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    return found


def _is_training_arguments(expression: ast.AST) -> bool:
    """`args.x`, `training.x`, `training_args.x`, `config.training.x`: the names medgpt gives trainer arguments."""
    if isinstance(expression, ast.Name):
        return expression.id in ("args", "training", "training_args")
    return isinstance(expression, ast.Attribute) and expression.attr in ("training", "args")


def test_trainer_options_medgpt_overwrites_are_refused_where_given():
    own = {f.name for cls in OWN_SECTIONS for f in dataclasses.fields(cls)}
    upstream = {f.name for s in load_stages().values() for f in dataclasses.fields(s.training_class)} - own
    found = overwritten_upstream_fields(upstream)
    assert {"remove_unused_columns", "prediction_loss_only", "label_names"} <= set(found)  # the scan works
    idle = [f"{name} ({', '.join(where)})" for name, where in sorted(found.items()) if name not in FIXED_OPTIONS]
    assert not idle, "medgpt overwrites these trainer options (refuse them in FIXED_OPTIONS): " + ", ".join(idle)


# ------------------------------------------------------------------------------------------------ refusals


ANOTHER_VALUE = {bool: lambda v: not v, float: lambda v: v + 0.1, list: lambda v: ["labels"],
                 type(None): lambda v: 2}


@pytest.mark.parametrize("name", sorted(FIXED_OPTIONS))
def test_each_fixed_option_is_refused_at_another_value_and_accepted_at_its_own(name):
    base = {"model_name_or_path": "m", "train_file_dir": "data/demo/sft", "output_dir": "o"}
    checked = 0
    for stage_name, (value, why) in FIXED_OPTIONS[name].items():
        stages = list(load_stages().values()) if stage_name == ANY_STAGE else [load_stages()[stage_name]]
        for stage in stages:
            if name not in stage_option_names(stage):
                continue
            assert build_config(stage, {**base, name: value})  # the value it runs with is fine
            with pytest.raises(Exception, match=re.escape(why[:40])):
                build_config(stage, {**base, name: ANOTHER_VALUE[type(value)](value)})
            checked += 1
    assert checked
