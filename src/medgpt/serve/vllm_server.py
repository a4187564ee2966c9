"""`medgpt serve --engine vllm`: start vLLM's OpenAI server from vLLM's own Python environment.

vLLM pins its own torch and transformers (0.33: `torch==2.14`, `transformers<5.21`), so it cannot be a medgpt
extra: it lives in a virtualenv of its own, and medgpt builds its command line from a trained output — a merged
model, or the base model plus the LoRA adapter — with the chat template the model was trained with.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from medgpt.config import ConfigError
from medgpt.data.chat_templates import get_named_template
from medgpt.data.templates import TEMPLATE_FILE
from medgpt.models.load import resolve_model_path
from medgpt.serve.engine import saved_template_name

logger = logging.getLogger(__name__)

INSTALL_HINT = ("install vLLM in an environment of its own (it pins its own torch and transformers): "
                "`python -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm`, then pass "
                "--vllm-python ~/vllm-env/bin/python")


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts


def vllm_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of this rank (r=4 -> 8, r=24 -> 32)."""
    for accepted in VLLM_LORA_RANKS:
        if rank <= accepted:
            return accepted
    raise ConfigError(f"LoRA rank {rank} is over vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}): merge the "
                      "adapter (`medgpt merge`) and serve the merged model")


class VLLMUnavailable(ConfigError):
    """The interpreter given cannot run vLLM; the message says why and how to install it."""


def vllm_version(python: str) -> str:
    """vLLM's version in that interpreter's environment, or VLLMUnavailable."""
    executable = shutil.which(python)
    if executable is None:
        raise VLLMUnavailable(f"{python}: no such Python interpreter; {INSTALL_HINT}")
    probe = subprocess.run([executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, timeout=600)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        raise VLLMUnavailable(f"{python} cannot import vllm ({reason}); {INSTALL_HINT}")
    return probe.stdout.strip().splitlines()[-1]


def vllm_command(python: str, model: str, host: str, port: int, served_name: str, template: str | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False, template_dir: str | Path | None = None,
                 extra_args: str = "") -> list[str]:
    """The vLLM command line for a trained output: a full model, or base + LoRA adapter served as `served_name`."""
    path = Path(resolve_model_path(model))
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", host, "--port", str(port)]
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        config = json.loads(adapter_config.read_text(encoding="utf-8"))
        base = resolve_model_path(config["base_model_name_or_path"])
        rank = vllm_lora_rank(int(config.get("r", 16)))
        command += ["--model", base, "--served-model-name", Path(base).name, "--enable-lora",
                    "--lora-modules", f"{served_name}={path}", "--max-lora-rank", str(rank)]
    else:
        command += ["--model", str(path), "--served-model-name", served_name]
    template_file = chat_template_file(path, template, template_dir)
    if template_file:
        command += ["--chat-template", str(template_file)]
    if dtype != "auto":
        command += ["--dtype", {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)]
    if trust_remote_code:
        command.append("--trust-remote-code")
    return command + shlex.split(extra_args)


def chat_template_file(path: Path, template: str | None, template_dir: str | Path | None) -> Path | None:
    """The template the model was trained with, as a file for `--chat-template`; None: the tokenizer's own.

    An adapter needs it said (vLLM reads the base model's tokenizer), as does a model trained on a named
    fallback template.
    """
    name = template or (None if (path / TEMPLATE_FILE).is_file() else saved_template_name(path))
    if name:
        target = Path(template_dir or tempfile.mkdtemp(prefix="medgpt-vllm-")) / f"{name}.jinja"
        target.write_text(get_named_template(name).jinja, encoding="utf-8")
        return target
    if (path / "adapter_config.json").is_file() and (path / TEMPLATE_FILE).is_file():
        return path / TEMPLATE_FILE
    return None


def run_vllm(command: list[str], api_key: str | None) -> int:
    """Check vLLM is there, then run its server in the foreground (the key goes by environment, not argv)."""
    version = vllm_version(command[0])
    logger.info("starting vLLM %s: %s", version, shlex.join(command))
    env = {**os.environ, **({"VLLM_API_KEY": api_key} if api_key else {})}
    return subprocess.call(command, env=env)
