"""Leaner activations: keep fewer tensors for the backward pass, recompute the cheap ones instead.

Without activation checkpointing, autograd keeps what each operation needs for its gradient. For the gated MLP
of Llama-style decoders, `down(act(gate(x)) * up(x))`, that is four (tokens x intermediate) tensors a layer:
g = gate(x) for act's backward, act(g) and u = up(x) for the product's backward, and the product itself for
down's LoRA (or weight) gradient. The last two are elementwise functions of g and u, so they are stored as a
recipe and recomputed in the backward pass (two elementwise operations a layer). Grouped-query attention
expands keys and values to every query head before SDPA, which then keeps the expanded copies; the packed
attention path (`models/attention.py`) stores the unexpanded ones and expands again when the backward needs them.

On a 1,024-token packed row of SmolLM2-135M this keeps 37% less for the backward pass (0.88 instead of 1.40 GB,
benchmarks/activation_memory.py), with the same gradients (tests/test_lean.py). It is a no-op while activation checkpointing (or anything else) has installed
saved-tensor hooks: those already decide what is kept, and an inner hook would override them.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# The forward this module re-implements, as transformers writes it (about 130 models share it).
GATED_MLP_FORWARD = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


def _outer_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None  # unknown torch: assume active, stay out of the way


class Recompute:
    """Saved-tensor hooks under which registered results are stored as (function, inputs) and rebuilt on use.

    Only results registered with `derive` inside the `with` block are affected; every other saved tensor is kept
    as usual. A result is matched by its storage, so the views autograd saves (e.g. the 2-D reshape a linear
    layer keeps) are rebuilt as the same view of the recomputed tensor.
    """

    def __init__(self):
        self._recipes: dict[int, tuple[torch.Tensor, Callable, tuple]] = {}
        self._hooks = None

    def __enter__(self) -> "Recompute":
        if torch.is_grad_enabled() and not _outer_hooks_active():
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
        self._recipes.clear()  # the results themselves must not outlive the block through this object

    def derive(self, result: torch.Tensor, fn: Callable, *inputs) -> torch.Tensor:
        """Mark `result == fn(*inputs)` (a fresh contiguous tensor) as cheaper to recompute than to keep."""
        if self._hooks is not None and result.is_contiguous() and result.storage_offset() == 0:
            self._recipes[result.untyped_storage().data_ptr()] = (result, fn, inputs)
        return result

    def _pack(self, tensor: torch.Tensor):
        entry = self._recipes.get(tensor.untyped_storage().data_ptr()) if tensor.device.type != "meta" else None
        if entry is None or entry[0].dtype != tensor.dtype:
            return tensor
        _, fn, inputs = entry
        return _Recipe(fn, inputs, tensor)


class _Recipe:
    """How to rebuild a saved tensor: the function, its inputs, the view autograd saved, and the autocast state
    of the forward (the backward usually runs outside autocast; the rebuilt values must be the forward's)."""

    __slots__ = ("fn", "inputs", "size", "stride", "offset", "dtype", "device", "autocast")

    def __init__(self, fn, inputs, saved: torch.Tensor):
        self.fn, self.inputs = fn, inputs
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()
        self.dtype, self.device = saved.dtype, saved.device.type
        self.autocast = (torch.is_autocast_enabled(self.device), torch.get_autocast_dtype(self.device))


def _unpack(packed):
    if not isinstance(packed, _Recipe):
        return packed
    enabled, dtype = packed.autocast
    with torch.no_grad(), torch.autocast(packed.device, dtype=dtype, enabled=enabled):
        full = packed.fn(*packed.inputs)
    return full.to(packed.dtype).as_strided(packed.size, packed.stride, packed.offset)


def _gated_product(act: Callable, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def lean_gated_mlp_forward(module, x: torch.Tensor) -> torch.Tensor:
    """`down(act(gate(x)) * up(x))`, keeping only gate(x) and up(x) for the backward pass."""
    with Recompute() as saved:
        gate, up = module.gate_proj(x), module.up_proj(x)
        activated = saved.derive(module.act_fn(gate), module.act_fn, gate)
        product = saved.derive(activated * up, _gated_product, module.act_fn, gate, up)
        del activated
        return module.down_proj(product)


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    """True when the class's forward is exactly `return EXPR` (or `y = EXPR; return y`) with EXPR the gated MLP:
    anything more (dropout, a residual, experts) and the module keeps its own forward."""
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        expression = body[0].value
    elif (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
          and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
          and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
        expression = body[0].value
    else:
        return False
    return ast.unparse(expression) == GATED_MLP_FORWARD


def use_lean_activations(model: torch.nn.Module) -> int:
    """Give every gated MLP of `model` the lean forward (on these instances only). Returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, "_medgpt_lean", False) or not _is_gated_mlp(module):
            continue
        module.forward = lean_gated_mlp_forward.__get__(module)
        module._medgpt_lean = True
        count += 1
    if count:
        logger.info("activations: %d gated MLPs keep gate and up only (the rest is recomputed in backward)", count)
    return count
