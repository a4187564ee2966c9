"""Stage 4c, on-policy distillation: the student answers prompts itself and learns the teacher's next-token
distribution on its own answers (generalised KD, Agarwal et al. 2024), with TRL's `DistillationTrainer`.

`beta` picks the divergence per token: 0 = forward KL(teacher ‖ student), 1 = reverse KL(student ‖ teacher, the
default: mode-seeking, the student need not cover everything the teacher might say), in between the generalised
Jensen–Shannon divergence. The logged `loss` is that divergence, averaged over the student's completion tokens.

Prompts: any conversation (the turns before the last assistant reply), QA, MCQ or preference file, tokenised by
our chat template (`medgpt.rl.trl_prompts`). The teacher (`teacher_model_name_or_path`) must share the student's
tokenizer — the two distributions are compared token by token — and is checked before any weights load; it is
loaded by our loader (embedded alias, dtype, optionally 4/8-bit to save memory) and never trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from trl import DistillationConfig, DistillationTrainer

from medgpt.arguments import ModelArguments, documented
from medgpt.config import ConfigError, RunConfig
from medgpt.models.load import load_model, load_tokenizer
from medgpt.rl.trl_prompts import ChatFormatPrompts, prepare_policy, prepare_prompts
from medgpt.stages import Stage, register
from medgpt.training.recipe import TrainingJob, datasets_sources, standard_callbacks, train_and_save

logger = logging.getLogger(__name__)
# DistillationConfig options for TRL's own teacher loading; ours loads the teacher, so they would do nothing.
TRL_TEACHER_OPTIONS = ("teacher_model_init_kwargs", "teacher_model_revision")


@dataclass
class TeacherArguments:
    """How the teacher is loaded (its path is `teacher_model_name_or_path`)."""

    teacher_load_in_4bit: bool = documented(
        """Load the teacher in 4-bit NF4 (bitsandbytes, `pip install 'medgpt[quant]'`): a quarter of its bf16
        memory for a slightly blurred distribution. It is only read, never trained.""",
        default=False,
    )
    teacher_load_in_8bit: bool = documented("Load the teacher in 8-bit (bitsandbytes): half its bf16 memory.",
                                            default=False)


class DistillStageTrainer(ChatFormatPrompts, DistillationTrainer):
    pass


def teacher_arguments(config: RunConfig) -> ModelArguments:
    """The teacher's loading options: its path and quantisation, the student's dtype, attention and trust."""
    t, m = config.extra(TeacherArguments), config.model
    if not config.training.teacher_model_name_or_path:
        raise ConfigError("stage distill needs teacher_model_name_or_path: the model whose answers the student learns")
    given = [name for name in TRL_TEACHER_OPTIONS if name in config.given]
    if given:
        raise ConfigError(f"{', '.join(given)}: medgpt loads the teacher itself; use teacher_load_in_4bit / "
                          "teacher_load_in_8bit and torch_dtype")
    if t.teacher_load_in_4bit and t.teacher_load_in_8bit:
        raise ConfigError("choose one of teacher_load_in_4bit and teacher_load_in_8bit")
    teacher = Path(config.training.teacher_model_name_or_path).expanduser()
    if (teacher / "adapter_config.json").is_file() and not (teacher / "config.json").is_file():
        raise ConfigError(f"the teacher {teacher} is a LoRA adapter: merge it first (`medgpt merge --adapter {teacher} --output DIR`) "
                          "and set teacher_model_name_or_path: OUT")
    return ModelArguments(model_name_or_path=config.training.teacher_model_name_or_path, torch_dtype=m.torch_dtype,
                          attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code,
                          cache_dir=m.cache_dir, load_in_4bit=t.teacher_load_in_4bit,
                          load_in_8bit=t.teacher_load_in_8bit)


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, teacher: str) -> None:
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError(f"the teacher {teacher} has another tokenizer than the student: on-policy distillation "
                          "compares next-token distributions token by token, so both need the same vocabulary "
                          "(e.g. a larger and a smaller model of one family)")


def setup(config: RunConfig):
    """Everything up to a ready trainer: (trainer, job, checkpoint to resume or None)."""
    teacher_args = teacher_arguments(config)
    start = prepare_prompts(config)
    check_same_vocabulary(start.tokenizer, load_tokenizer(teacher_args), teacher_args.model_name_or_path)
    model = prepare_policy(config, start)
    teacher = load_model(teacher_args, start.tokenizer).eval().requires_grad_(False)
    trainer = DistillStageTrainer(model=model, teacher_model=teacher, args=config.training, train_dataset=start.train,
                                  eval_dataset=start.eval, processing_class=start.tokenizer,
                                  callbacks=standard_callbacks(config.training.output_dir),
                                  chat_format=start.chat_format)
    stats = {"prompts": len(start.train), "teacher": teacher_args.model_name_or_path,
             "divergence": divergence_name(config.training.beta)}
    job = TrainingJob(config, start.tokenizer, start.chat_format, start.train, start.eval,
                      data_sources=datasets_sources(config), stats=stats)
    return trainer, job, start.resume


def divergence_name(beta: float) -> str:
    return {0.0: "forward KL", 1.0: "reverse KL"}.get(beta, f"generalised JSD (beta={beta:g})")


def run(config: RunConfig) -> dict:
    trainer, job, resume = setup(config)
    plots = ((("entropy", "eval_entropy"), "entropy.png", "student entropy"),)
    return train_and_save(trainer, job, resume, plots)


register(Stage(
    name="distill",
    summary="on-policy distillation: the student learns a teacher's token distribution on its own answers",
    run=run,
    training_class=DistillationConfig,
    extra_classes=(TeacherArguments,),
    data_kind="conversation",
))
