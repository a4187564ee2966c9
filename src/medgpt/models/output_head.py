"""How a causal LM turns its final hidden states into logits and its loss, read from the model's own `forward`:
the head, the elementwise steps after it (Cohere's `logit_scale`, Granite's `logits_scaling`, Falcon-H1's
`lm_head_multiplier`, Gemma 2's final softcapping …) and the MoE router loss added to the cross-entropy.

The chunked loss (`training/loss.py`) projects hidden states through the head itself, so it must apply the same
steps; a model whose forward does anything this reader does not recognise gets the stock loss instead. The
source is parsed (`ast`), not matched as text, and every value is read from the live model, so e.g. a Gemma 2
config with softcapping turned off yields no softcap step.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass

import torch

Step = tuple[str, float]  # ("mul", x) | ("div", x) | ("tanh", 0.0)


class Unsupported(Exception):
    """The forward does something to the logits or the loss this reader does not model."""


@dataclass(frozen=True)
class OutputHead:
    """The steps from `lm_head(hidden)` to the logits the loss sees, and the router-loss weight (MoE)."""

    steps: tuple[Step, ...] = ()
    router_aux_loss_coef: float | None = None
    attribute: str = "lm_head"  # the head's attribute name on the model (lm_head, output, embed_out …)

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        for op, value in self.steps:
            raw = raw * value if op == "mul" else raw / value if op == "div" else torch.tanh(raw)
        return raw


def read_output_head(model) -> OutputHead:
    """Parse `type(model).forward`; raise `Unsupported` (with the reason) when the chunked loss cannot match it."""
    try:
        source = textwrap.dedent(inspect.getsource(type(model).forward))
        function = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError) as err:
        raise Unsupported(f"cannot read {type(model).__name__}.forward") from err
    if "self.loss_function(" not in source or getattr(model.loss_function, "__name__", "") != "ForCausalLMLoss":
        raise Unsupported(f"{type(model).__name__} does not use the standard causal-LM loss")
    reader = _ForwardReader(model)
    reader.block(function.body)
    if not reader.found_head:
        raise Unsupported(f"no `logits = self.<head>(…)` in {type(model).__name__}.forward")
    coef = None
    if "aux_loss" in source:
        if "self.router_aux_loss_coef * aux_loss" not in source:
            raise Unsupported(f"{type(model).__name__} adds an auxiliary loss this reader does not know")
        coef = float(model.router_aux_loss_coef)
    return OutputHead(tuple(reader.steps), coef, reader.head_attribute)


class _ForwardReader:
    """Walk the statements of a forward in order, collecting what happens to `logits` after the head."""

    def __init__(self, model):
        self.model = model
        self.names: dict[str, object] = {}  # locals assigned from config values, e.g. `softcap = self.config.x`
        self.found_head = False
        self.head_attribute = "lm_head"
        self.steps: list[Step] = []

    def block(self, statements: list[ast.stmt]) -> bool:
        """False once a `return` is reached."""
        for statement in statements:
            if isinstance(statement, ast.Return):
                return False
            if isinstance(statement, ast.If) and _assigns_logits(statement):
                branch = statement.body if self.value(statement.test) else statement.orelse
                if not self.block(branch):
                    return False
            elif isinstance(statement, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                self.assignment(statement)
            elif _assigns_logits(statement):
                raise Unsupported(f"`logits` changed by a `{type(statement).__name__}` statement")
        return True

    def assignment(self, statement) -> None:
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if "logits" not in names:
            if len(names) == 1 and len(targets) == 1 and statement.value is not None:
                try:
                    self.names[names[0]] = self.value(statement.value)
                except Unsupported:
                    self.names.pop(names[0], None)  # not a config value: the name is unknown from here on
            elif any(isinstance(node, ast.Name) and node.id == "logits" for t in targets for node in ast.walk(t)):
                raise Unsupported("`logits` assigned by unpacking")
            return
        if isinstance(statement, ast.AugAssign):
            if not self.found_head:
                raise Unsupported("`logits` changed before the head")
            self.steps.append(self.scaling(statement.op, statement.value))
            return
        self.expression(statement.value)

    def expression(self, node: ast.expr) -> None:
        """`logits = <node>`: the head, optionally times or over a value, or one step applied to `logits`."""
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            self.expression(node.left)
            self.steps.append(self.scaling(node.op, node.right))
        elif self._is_head_call(node):
            if self.found_head:
                raise Unsupported("the head is applied twice")
            self.found_head, self.head_attribute = True, node.func.attr
        elif isinstance(node, ast.Name) and node.id == "logits" and self.found_head:
            return
        elif (isinstance(node, ast.Call) and _dotted(node.func) == "torch.tanh" and len(node.args) == 1
              and isinstance(node.args[0], ast.Name) and node.args[0].id == "logits" and self.found_head):
            self.steps.append(("tanh", 0.0))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "float"
              and not node.args and isinstance(node.func.value, ast.Name) and node.func.value.id == "logits"):
            return  # the chunked loss computes in fp32 anyway
        else:
            raise Unsupported(f"`logits = {ast.unparse(node)}`")

    def scaling(self, op: ast.operator, node: ast.expr) -> Step:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Unsupported(f"logits scaled by {ast.unparse(node)} = {value!r}, not a number")
        return ("mul" if isinstance(op, ast.Mult) else "div", float(value))

    def _is_head_call(self, node: ast.expr) -> bool:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            return False
        owner = node.func.value
        if not (isinstance(owner, ast.Name) and owner.id == "self"):
            return False
        head = self.model.get_output_embeddings()
        return head is not None and getattr(self.model, node.func.attr, None) is head

    def value(self, node: ast.expr):
        """A constant, a config value or a test on them; `Unsupported` for anything depending on inputs."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id == "self":
                return self.model
            if node.id in self.names:
                return self.names[node.id]
        elif isinstance(node, ast.Attribute):
            return getattr(self.value(node.value), node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get_text_config" \
                and not node.args:
            return self.value(node.func.value).get_text_config()
        elif isinstance(node, ast.NamedExpr):
            self.names[node.target.id] = self.value(node.value)
            return self.names[node.target.id]
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Is, ast.IsNot)):
            same = self.value(node.left) is self.value(node.comparators[0])
            return same if isinstance(node.ops[0], ast.Is) else not same
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not self.value(node.operand)
        elif isinstance(node, ast.BoolOp):
            values = [self.value(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        raise Unsupported(f"`{ast.unparse(node)}` depends on more than the model's configuration")


def _assigns_logits(node: ast.AST) -> bool:
    for child in ast.walk(node):
        targets = child.targets if isinstance(child, ast.Assign) else \
            [child.target] if isinstance(child, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)) else []
        if any(isinstance(t, ast.Name) and t.id == "logits" for t in targets):
            return True
    return False


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""
