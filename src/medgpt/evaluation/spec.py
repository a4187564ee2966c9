"""What an evaluation runs (`EvalSpec`): each file is optional and what is left out is not run; every option that
would do nothing with the files given is refused before anything is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medgpt.config import ConfigError
from medgpt.evaluation.benchmarks import FORMATS, NUMBERINGS
from medgpt.evaluation.mcq import check_scoring

DEFAULT_SCORING = "mean"  # measured on the demo set: see the README's evaluation section


@dataclass
class EvalSpec:
    perplexity_file: str | None = None  # held-out text (.txt a document per line, or .jsonl with `text`)
    mcq_file: str | None = None  # a benchmark file/folder as published, or a dataset name (load_dataset)
    mcq_format: str = "auto"  # medqa | medqa_hf | medmcqa | pubmedqa | cmexam | cmb | cmmlu | mmlu | mcq
    mcq_split: str | None = None  # for a dataset name or a local dataset folder: the split (default test)
    mcq_subset: str | None = None  # the dataset's config name (load_dataset's second argument)
    subjects: str | None = None  # comma-separated categories to keep; `medical`: MMLU's / CMMLU's medical ones
    medmcqa_numbering: str = "auto"  # MedMCQA `cop`: auto | hub (0-based) | original (1-based)
    mcq_scoring: str = DEFAULT_SCORING  # mean | sum | char | byte | letter | generate (medgpt.evaluation.mcq)
    mcq_prompt: str = "chat"  # chat (the model's template) | plain (lm-eval's text formats)
    mcq_cot: bool = False  # generate: reason step by step before the answer
    mcq_max_new_tokens: int | None = None  # generate: 16, or 512 with mcq_cot
    few_shot: int = 0  # solved examples shown before each question
    few_shot_file: str | None = None  # where they come from (a dev split, any format the MCQ reader knows)
    few_shot_from_eval_set: bool = False  # draw them from the evaluated set instead (never the question itself)
    preference_file: str | None = None  # held-out pairs: reward-model accuracy
    reward_model: str | None = None  # `medgpt rm` output: preference accuracy, answers' rewards, win rate
    open_file: str | None = None  # open questions (question/answer or conversation files): answers saved
    compare_with: str | None = None  # answers file or model: win rate of this model's answers over its answers
    judges: list[str] = field(default_factory=list)  # more judges of that win rate: reward-model dirs or URLs
    judge_model_name: str | None = None  # the `model` asked at a judge URL (default: the first it lists)
    limit: int | None = None  # first N items of each set
    open_limit: int | None = None  # first N open questions (default: limit); generation is the slow part
    max_new_tokens: int = 128
    max_length: int = 1024  # tokens per scored sequence (documents keep their start, MCQ prompts their end)
    batch_size: int = 8
    template: str | None = None  # named chat template (default: the one saved with the model)
    text_separator: str = "line"  # perplexity .txt: a document per line, or per blank-line paragraph
    torch_dtype: str = "auto"  # bf16 on GPUs (fp16 on old ones) and on CPUs with bf16 matrix units, else fp32
    trust_remote_code: bool = False
    seed: int = 0  # the bootstrap intervals' resampling

    def check(self) -> None:
        """Refuse options that would silently do nothing, before anything is read."""
        if not (self.perplexity_file or self.mcq_file or self.preference_file or self.open_file):
            raise ConfigError("nothing to evaluate: give a perplexity, mcq, preference or open-question file")
        if self.preference_file and not self.reward_model:
            raise ConfigError("reward accuracy on a preference file needs a reward model (`medgpt rm` output)")
        if self.compare_with and not (self.open_file and (self.reward_model or self.judges)):
            raise ConfigError("a win rate needs open questions to answer and a judge (a reward model, --judge-model "
                              "or --judge-url) to compare the answers")
        if self.judges and not self.compare_with:
            raise ConfigError("judges decide a win rate: give compare_with (another model or its answers file)")
        if self.judge_model_name and not any(j.startswith(("http://", "https://")) for j in self.judges):
            raise ConfigError("judge_model_name names the model asked at a judge URL: give a judge URL")
        if self.reward_model and not (self.preference_file or self.open_file):
            raise ConfigError("the reward model scores preference pairs or open answers: give one of those files")
        mcq_options = {"few_shot": self.few_shot, "few_shot_file": self.few_shot_file, "subjects": self.subjects,
                       "mcq_cot": self.mcq_cot, "mcq_split": self.mcq_split, "mcq_subset": self.mcq_subset,
                       "mcq_max_new_tokens": self.mcq_max_new_tokens,
                       "few_shot_from_eval_set": self.few_shot_from_eval_set}
        given = [k for k, v in mcq_options.items() if v]
        if given and not self.mcq_file:
            raise ConfigError(f"{', '.join(given)} apply to multiple-choice questions: give an mcq file")
        if self.mcq_format not in FORMATS:
            raise ConfigError(f"mcq_format '{self.mcq_format}' is not one of {', '.join(FORMATS)}")
        if self.medmcqa_numbering not in NUMBERINGS:
            raise ConfigError(f"medmcqa_numbering '{self.medmcqa_numbering}' is not one of {', '.join(NUMBERINGS)}")
        check_scoring(self.mcq_scoring, self.mcq_prompt, self.mcq_cot)
        if self.mcq_max_new_tokens and self.mcq_scoring != "generate":
            raise ConfigError("mcq_max_new_tokens bounds generated answers: it needs mcq_scoring: generate")
        if self.few_shot and not (self.few_shot_file or self.few_shot_from_eval_set):
            raise ConfigError("few_shot examples come from a separate dev file: give few_shot_file, or set "
                              "few_shot_from_eval_set to draw them from the evaluated questions")
        if (self.few_shot_file or self.few_shot_from_eval_set) and not self.few_shot:
            raise ConfigError("few_shot_file / few_shot_from_eval_set choose where few-shot examples come from: "
                              "set few_shot to how many")
        if self.few_shot_file and not Path(self.few_shot_file).exists():
            raise ConfigError(f"few_shot_file {self.few_shot_file}: no such file or folder (a dev split on disk; "
                              "a hub name is refused so that a test split never becomes the examples)")
        if self.few_shot_file and self.few_shot_from_eval_set:
            raise ConfigError("few_shot_file and few_shot_from_eval_set are two sources: choose one")
        if self.few_shot < 0 or self.batch_size < 1 or any(n is not None and n < 1 for n in (self.limit, self.open_limit)):
            raise ConfigError("few_shot must be >= 0, limit, open_limit and batch_size >= 1")
