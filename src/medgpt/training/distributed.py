"""Which distributed engine a run uses: what the launcher asked for (torchrun, `accelerate launch` with a DDP, FSDP
or DeepSpeed config, `deepspeed:`/`fsdp:` in the config) checked against what the live accelerator runs, set up
before any model loads, and recorded in train_results.json (`live_engine`).

On GPUs accelerate and the Trainer do the work. On CPU accelerate 1.x never shards (its state turns FSDP on only for
GPU-like devices) and engages DeepSpeed only without `use_cpu`, where it then finds no backend and leaves each process
alone at world size 1. So on CPU:
- FSDP runs as DDP over gloo with one warning, or — `MEDGPT_CPU_FSDP=1` — as real FSDP2: the Trainer's own
  accelerator with an FSDP2 plugin (`_fsdp_on_cpu`). That is the code path accelerate runs on GPUs
  (`fsdp2_prepare_model`, sharded checkpoints through torch.distributed.checkpoint, the gather at save), which is
  why the tests use it rather than wrapping the model ourselves: our own `fully_shard` would prove our wrapper,
  not the one users run, and the Trainer would still wrap it in DDP.
- DeepSpeed runs for real: DeepSpeed has a CPU accelerator, and a PartialState configured with the gloo backend
  before the Trainer starts (`use_configured_state`) lets accelerate hand the model to it.
- N processes that each run alone (world size 1) are refused: each would train on all the data and write the
  same output directory.
"""

from __future__ import annotations

import logging
import os

import torch

from medgpt.config import ConfigError

logger = logging.getLogger(__name__)

CPU_FSDP_ENV = "MEDGPT_CPU_FSDP"  # 1: shard with FSDP2 on CPU instead of falling back to DDP


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, deepspeed) started in all."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def requested_engine(args) -> str:
    """single | ddp | fsdp | deepspeed: what the launcher's environment and the training options ask for."""
    if getattr(args, "deepspeed", None) or _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if getattr(args, "fsdp_plugin_args", None) is not None or _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if launched_processes() > 1 else "single"


def live_engine(accelerator=None) -> dict:
    """What is running now, for train_results.json: `distributed_type` (single | ddp | fsdp | deepspeed),
    `world_size` and, under DeepSpeed, `zero_stage`. `accelerator`: a Trainer's Accelerator or an accelerate
    PartialState (PPO's loop); by default the process-wide state."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = getattr(accelerator, "state", accelerator)
    if state is None:
        state = AcceleratorState() if AcceleratorState._shared_state else PartialState()
    kind, world = state.distributed_type, state.num_processes
    if kind == DistributedType.FSDP:
        name = "fsdp"
    elif kind == DistributedType.DEEPSPEED:
        name = "deepspeed"
    elif world > 1 and kind != DistributedType.NO:
        name = "ddp"  # MULTI_CPU, MULTI_GPU, MULTI_NPU, ...: data parallel, every process holds the model
    else:
        name = "single"
    engine = {"distributed_type": name, "world_size": world}
    if name == "deepspeed":
        plugin = getattr(AcceleratorState(), "deepspeed_plugin", None) if AcceleratorState._shared_state else None
        engine["zero_stage"] = int(plugin.zero_stage) if plugin is not None else None
    return engine


def configure_engine(args) -> None:
    """Before any model loads: refuse independent single-process runs under a multi-process launch, and on CPU
    turn an FSDP request into DDP (one warning) or FSDP2 (`MEDGPT_CPU_FSDP=1`), a DeepSpeed request into DeepSpeed
    over gloo. `args` (the stage's TrainingArguments) is changed in place: stages hold references to it."""
    launched, requested = launched_processes(), requested_engine(args)
    if launched == 1 and requested == "deepspeed" and not torch.cuda.is_available():
        raise ConfigError("DeepSpeed on CPU needs a multi-process launch (its gloo group is set up by the launcher): "
                          "`accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes "
                          "2 -m medgpt.cli …`, or remove `deepspeed` to train in one process")
    if launched == 1 and requested == "fsdp" and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        args.fsdp_plugin_args = None
        logger.warning("FSDP with one process on CPU: nothing to shard, this runs as a single process "
                       "(train_results.json says single); launch 2 or more processes to shard")
    if launched > 1 and not torch.cuda.is_available():
        if requested == "fsdp":
            if _flag(CPU_FSDP_ENV):
                _fsdp_on_cpu(args)
            else:
                _fsdp_as_ddp(args)
        elif requested == "deepspeed":
            _deepspeed_on_cpu(args)
    if launched > 1 and args.world_size == 1:
        raise ConfigError(
            f"the launcher started {launched} processes but each runs alone (world size 1): they would all train on "
            "all the data and write the same output directory. On CPU keep use_cpu: true (the default) so "
            "accelerate forms one gloo group, or launch with `torchrun --nproc_per_node N -m medgpt.cli …`")


def _fsdp_as_ddp(args) -> None:
    """Data parallel instead: every process loads the whole model (no rank-0-only loading, which FSDP's
    `cpu_ram_efficient_loading` would do and DDP cannot use)."""
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    args.fsdp_plugin_args = None
    if args.process_index == 0:
        logger.warning("FSDP needs GPUs (accelerate shards only on GPU-like devices): on CPU this runs as DDP over gloo, "
                       "each of the %d processes holding the whole model (train_results.json says ddp; %s=1 shards "
                       "with FSDP2 on CPU instead)", launched_processes(), CPU_FSDP_ENV)


def _fsdp_on_cpu(args) -> None:
    """Initialise the process-wide accelerator state as FSDP2 over gloo; the Trainer's Accelerator then finds it
    (accelerate keeps one shared state) and prepares, checkpoints and saves exactly as it does on GPUs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin_args = dict(args.fsdp_plugin_args or {})
    plugin = FullyShardedDataParallelPlugin(**plugin_args)  # from the FSDP_* variables accelerate launch sets
    if plugin.fsdp_version != 2:
        raise ConfigError(f"{CPU_FSDP_ENV}=1 shards with FSDP2 only: set fsdp_version: 2 in the accelerate config")
    Accelerator(cpu=True, mixed_precision=args.mixed_precision)  # MULTI_CPU state over gloo, mixed precision as the Trainer's
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState() re-reads it
    if args.process_index == 0:
        logger.warning("FSDP2 on CPU (%s=1): %d processes over gloo, parameters sharded; "
                       "meant to check a sharded run before GPUs", CPU_FSDP_ENV, launched_processes())


def _deepspeed_on_cpu(args) -> None:
    """A PartialState with the gloo backend and DeepSpeed on (its CPU accelerator), used by the Trainer through
    `use_configured_state`; `use_cpu` off, because accelerate skips DeepSpeed whenever it is on."""
    from accelerate.state import AcceleratorState, PartialState

    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ConfigError("DeepSpeed is not installed: pip install 'medgpt[deepspeed]'") from err
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    AcceleratorState._reset_state(reset_partial_state=True)  # the torch process group stays; DeepSpeed reuses it
    PartialState(backend="gloo", timeout=args.ddp_timeout_delta)
    if args.use_cpu:  # still the CPU: DeepSpeed's CPU accelerator; accelerate skips DeepSpeed while the flag is on
        args.use_cpu = False
    args.accelerator_config.use_configured_state = True
    args.__dict__.pop("_setup_devices", None)  # a cached_property: the device and world size are read again
    if args.process_index == 0:
        logger.warning("DeepSpeed on CPU: its CPU accelerator over gloo, %d processes (meant to check a ZeRO "
                       "run before GPUs)", launched_processes())


def announce_engine(trainer) -> dict:
    """One log line saying what runs, once the Trainer has its accelerator; a request the accelerator did not
    honour on a GPU machine (where nothing above changed it) is an error, not a silent substitute."""
    engine = live_engine(trainer.accelerator)
    requested = requested_engine(trainer.args)
    if requested in ("fsdp", "deepspeed") and engine["distributed_type"] != requested and torch.cuda.is_available():
        config = "fsdp.yaml" if requested == "fsdp" else "deepspeed_zero3.yaml"
        raise ConfigError(f"{requested} was requested but the trainer runs {engine['distributed_type']}: launch with "
                          f"`accelerate launch --config_file configs/accelerate/{config} -m medgpt.cli …`")
    if trainer.is_world_process_zero():
        extra = f", ZeRO stage {engine['zero_stage']}" if "zero_stage" in engine else ""
        logger.info("engine: %s, %d process(es)%s", engine["distributed_type"], engine["world_size"], extra)
    return engine
