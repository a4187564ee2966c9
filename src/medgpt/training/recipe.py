"""The training recipe stages share: check the output directory, train (or resume) a Trainer, save the
final outputs. `train_causal_lm` is the causal-LM (PT, SFT) instance; other Trainer-based stages reuse
`begin_run`, `start_logs`, `standard_callbacks` and `train_and_save` (PPO, with its own loop, `save_final`).

Output directory after a run: the model or adapter, tokenizer, chat template, `run_config.yaml`,
`metrics.jsonl`, `loss.png`, `README.md` (model card) and, written last, `train_results.json` — a directory
with that file is complete. The final save is staged in a temporary directory and moved in by renames.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medgpt.config import RunConfig, write_run_config
from medgpt.data.collators import PaddedCollator, PaddingFreeCollator
from medgpt.data.templates import ChatFormat
from medgpt.models.adapters import attach_adapter, count_parameters, freeze_layers, split_names
from medgpt.models.lean import use_lean_activations
from medgpt.models.load import keep_trainable_fp32, load_model, weights_purpose
from medgpt.outputs import prepare_output_dir, write_model_card
from medgpt.metrics_files import METRICS_FILE, RESULTS_FILE, MetricsWriter, read_metrics
from medgpt.report import plot_losses, plot_series
from medgpt.serve.engine import save_template_name
from medgpt.training.checkpoints import MarkCompleteCheckpoints, resolve_resume, resume_training
from medgpt.training.distributed import announce_engine, configure_engine, live_engine
from medgpt.training.precision import keep_fp32_master_weights
from medgpt.training.trainer import CausalLMTrainer, use_chunked_loss
from medgpt.training.weights import check_deepspeed_config, check_weights_saved, is_sharded, save_full_weights

logger = logging.getLogger(__name__)
CARD_METRICS = ("loss", "perplexity", "accuracy", "margin", "reward")  # what the model card's table shows


@dataclass
class TrainingJob:
    """What a stage hands the recipe: its config, tokenizer, template and features."""

    config: RunConfig
    tokenizer: Any
    chat_format: ChatFormat | None
    train: Any  # datasets.Dataset or an IterableDataset of features
    eval: Any = None
    packing: bool = True
    loss_chunk_size: int = 1024
    data_sources: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # written into train_results.json
    sample_prompts: list = field(default_factory=list)  # conversations answered into samples.jsonl at the end


def add_new_tokens(tokenizer, new_tokens_file: str | None) -> int:
    """Add the tokens listed one per line in `new_tokens_file` to the tokenizer (before tokenising data)."""
    if not new_tokens_file:
        return 0
    tokens = [t.strip() for t in Path(new_tokens_file).read_text(encoding="utf-8").splitlines() if t.strip()]
    added = tokenizer.add_tokens(tokens)
    logger.info("%s: %d of %d tokens are new; vocabulary now %d", new_tokens_file, added, len(tokens), len(tokenizer))
    return added


def resize_for_tokenizer(model, tokenizer) -> bool:
    """Grow the embeddings (mean-initialised rows) when the tokenizer outgrew them; never otherwise.

    Models often carry spare rows (Qwen: 151,936 rows for 151,665 tokens); resizing those would be a needless
    change of shape, and resizing at all is what broke MedicalGPT's merge when nothing was added. Under
    DeepSpeed ZeRO-3 the weight is a partition of shape [0]; its real shape is `ds_shape`.
    """
    weight = model.get_input_embeddings().weight
    if len(tokenizer) <= getattr(weight, "ds_shape", weight.shape)[0]:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return True


def prepare_model(config: RunConfig, tokenizer, context_length: int | None, loss_chunk_size: int):
    """Load, extend the vocabulary, route the loss through the chunked path, keep fewer activations for the
    backward pass (`models/lean.py`), attach LoRA or freeze layers."""
    from transformers import set_seed

    set_seed(config.training.seed)  # the adapter's and new embeddings' initialisation follow `seed` too
    model = load_model(config.model, tokenizer, context_length=context_length, purpose=weights_purpose(config))
    vocabulary_changed = resize_for_tokenizer(model, tokenizer)
    use_chunked_loss(model, loss_chunk_size)
    use_lean_activations(model)
    if config.adapter.use_peft:
        extra = ["embed_tokens", "lm_head"] if vocabulary_changed else None
        model = attach_adapter(model, config.adapter, "CAUSAL_LM", extra, config.model.gradient_checkpointing)
        keep_trainable_fp32(model)  # a bf16 base's copied modules (new embeddings) train in fp32
    else:
        freeze_layers(model, config.adapter.freeze_trainable_layers)
    log_trainable(model)
    return model


def log_trainable(model) -> tuple[int, int]:
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
                100 * trainable / max(total, 1))
    return trainable, total


def method_name(config: RunConfig) -> str:
    a = config.adapter
    if not a.use_peft:
        return f"full (top {a.freeze_trainable_layers} layers)" if a.freeze_trainable_layers else "full"
    kind = "QLoRA" if config.model.load_in_4bit else ("LoRA on 8-bit" if config.model.load_in_8bit else "LoRA")
    extras = [x for x, on in (("DoRA", a.use_dora), ("rsLoRA", a.use_rslora)) if on]
    return f"{kind} r={a.lora_rank} alpha={a.lora_alpha:g} targets={a.target_modules}" + "".join(f", {x}" for x in extras)


def begin_run(config: RunConfig) -> str | None:
    """Before any heavy work: set up the distributed engine the launcher asked for (`training/distributed.py`),
    find the checkpoint to resume from and check the output directory may be used."""
    args = config.training
    configure_engine(args)
    check_deepspeed_config(args)
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if args.process_index == 0:  # other ranks would see rank 0's files and refuse the directory
        prepare_output_dir(args.output_dir, config.run.overwrite_output_dir, resuming=resume is not None)
    return resume


def train_causal_lm(job: TrainingJob, model, resume: str | None) -> dict[str, Any]:
    args = job.config.training
    start_logs(job.config, resume)
    # Our forward computes the loss and no logits; positions and labels are our own columns.
    neftune, args.neftune_noise_alpha = args.neftune_noise_alpha, None
    args.remove_unused_columns = False
    args.prediction_loss_only = True
    collator = PaddingFreeCollator() if job.packing else PaddedCollator(job.tokenizer.pad_token_id)
    if job.packing:
        use_packed_attention(model, job.config)
    trainer = CausalLMTrainer(
        model=model, args=args, train_dataset=job.train, eval_dataset=job.eval, data_collator=collator,
        processing_class=job.tokenizer, callbacks=standard_callbacks(args.output_dir), neftune_alpha=neftune,
    )
    return train_and_save(trainer, job, resume, evaluated=perplexity)


def perplexity(evaluation: dict[str, float]) -> dict[str, float]:
    return {"eval_perplexity": math.exp(min(evaluation["eval_loss"], 50))}


def use_packed_attention(model, config: RunConfig | None = None) -> str | None:
    """Packed rows under SDPA: attend per document instead of through one block-diagonal mask (same result). On
    CUDA with flash-attn installed and 16-bit compute, flash-attention's varlen kernel instead, unless the config
    chose `attn_implementation` itself. Returns the attention now used, or None when unchanged."""
    import importlib.util

    import torch

    from medgpt.models.attention import register_packed_attention, set_attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != "sdpa":
        return None
    args = config.training if config is not None else None
    half = args is not None and (args.bf16 or args.fp16) or next(base.parameters()).dtype in (torch.bfloat16,
                                                                                             torch.float16)
    if (config is not None and "attn_implementation" not in config.given and half and torch.cuda.is_available()
            and torch.device(args.device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None):
        set_attention(model, "flash_attention_2")
        logger.info("attention: flash-attention 2 varlen kernel on packed rows (flash-attn is installed)")
        return "flash_attention_2"
    set_attention(model, register_packed_attention())
    logger.info("attention: SDPA per packed document (sdpa_packed)")
    return "sdpa_packed"


def standard_callbacks(output_dir: str | Path) -> list:
    """metrics.jsonl for every logged step, and completion markers on checkpoints."""
    return [MetricsWriter(Path(output_dir) / METRICS_FILE), MarkCompleteCheckpoints()]


def start_logs(config: RunConfig, resume: str | None, logs: tuple[str, ...] = (METRICS_FILE,)) -> None:
    """run_config.yaml into the output directory; the logs start afresh unless resuming (a resumed run trims and
    appends to them)."""
    args = config.training
    if args.process_index == 0:
        if resume is None:
            for name in logs:
                (Path(args.output_dir) / name).unlink(missing_ok=True)
        write_run_config(config, args.output_dir)


def train_and_save(trainer, job: TrainingJob, resume: str | None, plots: tuple = (),
                   evaluated: Callable[[dict], dict] | None = None,
                   final_stats: Callable[[Any], dict] | None = None) -> dict[str, Any]:
    """Train (or resume), evaluate when there is a validation split, save; the metrics, as train_results.json.

    `evaluated(evaluation)` adds numbers derived from the evaluation (perplexity), `final_stats(trainer)` numbers
    known only after training; `job.stats` (data counts) go in as they are.
    """
    announce_engine(trainer)
    keep_fp32_master_weights(trainer, job.config)
    metrics = resume_training(trainer, resume)
    if job.eval is not None and len(job.eval) > 0:
        evaluation = trainer.evaluate()
        metrics.update(evaluation)
        if evaluated is not None:
            metrics.update(evaluated(evaluation))
    metrics.update(world_size=job.config.training.world_size, global_step=trainer.state.global_step, **job.stats)
    if final_stats is not None:
        metrics.update(final_stats(trainer))
    save_final(trainer, job, metrics, plots=plots)
    return metrics


def save_final(trainer, job: TrainingJob, metrics: dict[str, Any], plots: tuple = ()) -> None:
    """Stage the final model in a temporary directory, check its weights, move it in, write train_results.json
    last. Every process calls this: gathering sharded weights and answering sample prompts with a sharded model
    need all of them; rank 0 alone writes."""
    output = Path(job.config.training.output_dir)
    staging = output / ".final-tmp"
    main = trainer.is_world_process_zero()
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")  # TRL's frozen reference copy of an adapter is not part of the result
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    save_full_weights(trainer, staging)
    samples = None
    if job.sample_prompts and job.chat_format is not None and (main or is_sharded(trainer)):
        samples = answer_samples(trainer.model, job)  # every process when each holds only part of the weights
    # what ran: the accelerator's engine, unless the trainer shards by itself (the RL loop) and says so
    metrics.update(getattr(trainer, "engine", None) or live_engine(trainer.accelerator))
    if main:
        check_weights_saved(staging)  # before anything marks the run complete
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; run_config.yaml says it all
        job.tokenizer.save_pretrained(staging)
        if job.chat_format is not None:
            job.chat_format.save(staging)
            save_template_name(staging, job.config.run.template)
        config = job.config
        if samples is not None:
            write_samples(samples, staging / "samples.jsonl")
        write_model_card(staging, title=output.resolve().name, base_model=config.model.model_name_or_path, stages=[config.stage],
                         data=job.data_sources, method=method_name(config), template=config.run.template or "",
                         metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))
                                  and any(word in k for word in CARD_METRICS)})
        for item in staging.iterdir():
            target = output / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        staging.rmdir()
        plot_losses(output / METRICS_FILE, output / "loss.png", f"{config.stage}: loss")
        for keys, name, title in plots:  # stage-specific pictures, e.g. rewards or KL
            plot_series(read_metrics(output / METRICS_FILE), list(keys), output / name, f"{config.stage}: {title}")
        metrics.update(peak_memory(trainer.args.device))
        (output / RESULTS_FILE).write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")
        logger.info("saved %s to %s", "adapter" if config.adapter.use_peft else "model", output)
    trainer.accelerator.wait_for_everyone()


def peak_memory(device) -> dict[str, float]:
    """This process's peak host memory (RSS), and the accelerator's peak allocation where there is one."""
    import resource

    import torch

    peak = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}  # KiB on Linux
    if torch.device(device).type == "cuda":
        peak["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return peak


def answer_samples(model, job: TrainingJob) -> list[dict]:
    """Answer a few held-out prompts with the freshly trained model (greedy), for a first look. Greedy decoding of
    the same prompts takes the same steps on every process, so sharded models run their collectives in step."""
    from medgpt.serve.engine import GenerationEngine, SamplingParams

    engine = GenerationEngine(model, job.tokenizer, job.chat_format)
    completions = engine.generate(job.sample_prompts, SamplingParams(max_new_tokens=128, temperature=0))
    model.train()
    return [{"prompt": messages[-1].content, "answer": completion.text, "finish_reason": completion.finish_reason}
            for messages, completion in zip(job.sample_prompts, completions)]


def write_samples(samples: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")


def datasets_sources(config: RunConfig) -> list[str]:
    d = config.data
    return [s for s in [*split_names(d.train_file_dir), d.dataset_name] if s]
