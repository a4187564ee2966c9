"""Rollouts from a vLLM server running in its own environment (vLLM pins torch and transformers versions that
cannot share ours), over its OpenAI-compatible HTTP API.

Start the server on the same base model, with runtime LoRA loading on:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora --max-lora-rank 64

Weights are synced by files: after each PPO step the actor's LoRA adapter is saved under `sync_dir` (a path
the server can read) and loaded there as a new adapter `policy-step-N` through `/v1/load_lora_adapter`; the
previous one is unloaded. Prompts go as token ids to `/v1/completions` and token ids come back
(`return_token_ids`), so what PPO scores is exactly what was sampled. Full-parameter training cannot sync
this way (a whole model per step); it generates with the HF backend.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from medgpt.serve.engine import SamplingParams

logger = logging.getLogger(__name__)

SERVER_HINT = ("start vLLM with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve BASE --enable-lora "
               "--max-lora-rank R` (R >= lora_rank) on the base model being trained")


class VLLMError(RuntimeError):
    """The vLLM server refused a request or could not be reached; the message says which and why."""


class VLLMRollouts:
    """The `RolloutBackend` of `medgpt.rl.rollouts` over HTTP."""

    def __init__(self, base_url: str, stop_token_ids: list[int], sync_dir: str | Path, model: str | None = None,
                 timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.stop_token_ids = list(stop_token_ids)
        self.sync_dir = Path(sync_dir)
        self.timeout = timeout
        self.base_model = model or self.served_models()[0]  # what to ask for until an adapter is loaded
        self.adapter: str | None = None  # name of the loaded policy adapter

    # ---------------------------------------------------------------------------------------- HTTP

    def _request(self, path: str, payload: dict | None = None) -> dict | str:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(self.base_url + path, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read().decode("utf-8")
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:500]
            raise VLLMError(f"vLLM server {self.base_url}{path} answered {err.code}: {detail}") from None
        except urllib.error.URLError as err:
            raise VLLMError(f"cannot reach the vLLM server at {self.base_url} ({err.reason}): {SERVER_HINT}") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body  # the LoRA endpoints answer in plain text

    def served_models(self) -> list[str]:
        models = [m["id"] for m in self._request("/v1/models").get("data", [])]
        if not models:
            raise VLLMError(f"the vLLM server at {self.base_url} serves no model")
        return models

    # ---------------------------------------------------------------------------------------- rollouts

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        payload = {
            "model": self.adapter or self.base_model,
            "prompt": prompts,  # token ids: no second tokenisation on the server
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop_token_ids": self.stop_token_ids,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if params.top_k:
            payload["top_k"] = params.top_k
        if params.seed is not None:
            payload["seed"] = params.seed
        choices = sorted(self._request("/v1/completions", payload)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise VLLMError(f"asked for {len(prompts)} completions, the server returned {len(choices)}")
        return [self._response_ids(choice) for choice in choices]

    def _response_ids(self, choice: dict) -> list[int]:
        ids = choice.get("token_ids")
        if ids is None:
            raise VLLMError("the server returned no token ids: vLLM >= 0.10.2 is needed (`return_token_ids`)")
        ids = list(ids)
        # Stopped on an end-of-turn id: make sure it is there, as HF generation leaves it (PPO trains on it).
        if choice.get("finish_reason") == "stop" and (not ids or ids[-1] not in self.stop_token_ids):
            ids.append(self.stop_token_ids[0])
        return ids

    def sync(self, policy, step: int) -> None:
        """Save the actor adapter and make the server generate with it from now on."""
        name = f"policy-step-{step}"
        path = self.sync_dir / name
        shutil.rmtree(path, ignore_errors=True)
        policy.save_pretrained(str(path), selected_adapters=["default"])
        self._request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})
        previous, self.adapter = self.adapter, name
        if previous:
            self._request("/v1/unload_lora_adapter", {"lora_name": previous})
            shutil.rmtree(self.sync_dir / previous, ignore_errors=True)
        logger.info("vLLM now generates with %s", name)
