"""FSDP2 for the RL loop's full-parameter training: the actor and the frozen backbone (critic, reference and reward
roles) are sharded over the processes, a unit per decoder layer, each role's pass module the root that gathers
the rest (embeddings, final norm, LM head, value head).

Asked for by `fsdp: full_shard` (TrainingArguments' `fsdp` / `fsdp_config`, version 2) or by `accelerate launch`
with an FSDP2 config (ACCELERATE_USE_FSDP). Generation runs on gathered weights: before each rollout every process
unshards the policy's units once (the weights it needs, the size of one unsharded policy) and keeps them for the
whole `generate` call, so processes need not take the same number of decoding steps; they are resharded right
after. Gradients of sharded weights are reduce-scattered (averaged) by FSDP2 in each backward pass, so the
loop's own averaging skips them (`medgpt.rl.distributed`). LoRA runs stay data parallel: the adapters are small,
and peft's adapter switching is not FSDP2's business.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from medgpt.config import ConfigError
from medgpt.models.adapters import _decoder_layers
from medgpt.rl.distributed import world_size

logger = logging.getLogger(__name__)

ALLOWED_FSDP_CONFIG = {"version", "reshard_after_forward", "min_num_params", "xla", "xla_fsdp_v2",
                       "xla_fsdp_grad_ckpt", "cpu_ram_efficient_loading", "auto_wrap_policy",
                       "transformer_layer_cls_to_wrap", "state_dict_type", "offload_params", "cpu_offload"}


def _true(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def requested(args) -> dict | None:
    """The FSDP2 settings the run asks for ({"reshard_after_forward": bool}), or None for data parallel.
    Refuses what this loop cannot honour, before any weights load."""
    if _true(os.environ.get("ACCELERATE_USE_FSDP", "false")):
        version = os.environ.get("FSDP_VERSION", "1")
        settings = {"version": version, "cpu_offload": os.environ.get("FSDP_OFFLOAD_PARAMS", "false"),
                    "cpu_ram_efficient_loading": os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false"),
                    "reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")}
        source = "the accelerate FSDP config"
    elif args.fsdp:
        settings, source = dict(args.fsdp_config or {}), "fsdp_config"
        unknown = sorted(set(settings) - ALLOWED_FSDP_CONFIG)
        if unknown:
            raise ConfigError(f"fsdp_config {', '.join(unknown)}: the RL loop's FSDP2 does not use them; it reads "
                              "version (2) and reshard_after_forward")
    else:
        return None
    if str(settings.get("version", 2)) != "2":
        raise ConfigError(f"{source}: the RL loop shards with FSDP2 only: set fsdp_version 2")
    for key, why in (("cpu_offload", "parameter offloading"), ("offload_params", "parameter offloading"),
                     ("cpu_ram_efficient_loading", "loading the weights on rank 0 only (every process loads them "
                                                   "itself here: set fsdp_cpu_ram_efficient_loading false)")):
        if _true(settings.get(key, False)):
            raise ConfigError(f"{source}: {why} is not supported by the RL loop's FSDP2")
    raw = settings.get("reshard_after_forward", True)
    return {"reshard_after_forward": raw if isinstance(raw, bool) else _true(raw)}


def _units(model) -> list[torch.nn.Module]:
    prefix, _ = _decoder_layers(model)
    return list(model.get_submodule(prefix))


def shard_roles(network, reshard_after_forward: bool = True) -> None:
    """fully_shard the actor's and the backbone's decoder layers, then their pass modules as roots; the network's
    parameter lists are rebuilt (sharding replaces every parameter by a DTensor one)."""
    from torch.distributed.fsdp import fully_shard

    if network.lora:
        raise ConfigError("FSDP2 shards full-parameter RL (use_peft: false); LoRA RL runs data parallel "
                          "(torchrun without fsdp): the base is frozen and the adapters are small")
    roots = [(network.policy, network.actor_forward)]
    if network.backbone is not None:
        roots.append((network.backbone.get_base_model() if hasattr(network.backbone, "get_base_model")
                      else network.backbone, network.backbone_forward))
    policy_modules = []
    for model, root in roots:
        units = [fully_shard(layer, reshard_after_forward=reshard_after_forward) for layer in _units(model)]
        fully_shard(root, reshard_after_forward=reshard_after_forward)
        if root is network.actor_forward:
            policy_modules = [*units, root]
    network.refresh_trainable()
    network.gather_for_generation = lambda: gathered(policy_modules, reshard_after_forward)
    _prime(network)
    logger.info("FSDP2: actor%s sharded over %d processes (%d decoder layers each)",
                " and backbone" if network.backbone is not None else "", world_size(), len(policy_modules) - 1)


@torch.no_grad()
def _prime(network) -> None:
    """Run each root once, so FSDP2 takes the pass modules (not a layer generation happens to call first) as
    its roots."""
    device = next(network.policy.parameters()).device
    ids = torch.tensor([[0, 0]], device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(2)[None].to(device)}
    mask = torch.ones(1, 1, device=device)
    network.actor_forward(batch, ids[:, -1:], mask, 1.0, "none")
    if network.backbone_forward is not None:
        network.backbone_forward("reference", batch, ids[:, -1:], mask)


@contextlib.contextmanager
def gathered(modules, reshard_after_forward: bool = True):
    """Every module's weights unsharded (one all-gather each) for the whole block, then sharded again."""
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(reshard_after_forward, recurse=False)


def distributed_summary(sharded: bool) -> dict:
    """What ran, in the keys and words the Trainer stages record in train_results.json (`live_engine`): the RL
    loop shards with `fully_shard` itself, which the accelerator's state does not know about."""
    kind = "fsdp" if sharded else "ddp" if world_size() > 1 else "single"
    return {"distributed_type": kind, "world_size": world_size()}
