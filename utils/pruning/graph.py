"""Reading a model's data flow with ``torch.fx``: which module feeds which.

Pruning needs this twice: to find the BatchNorm that follows a pruned layer (its units
must be silenced too), and to cut the next layer's inputs when a unit is removed.
"""

from __future__ import annotations

import warnings

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

LAYERS = (nn.Linear, _ConvNd)  # the prunable layers: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d
# Operations that map a zero channel to a zero channel and keep channels apart.
ZERO_PRESERVING_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
ZERO_PRESERVING_NAMES = {
    "relu",
    "relu_",
    "relu6",
    "leaky_relu",
    "tanh",
    "gelu",
    "silu",
    "hardswish",
    "dropout",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "_max_pool2d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool2d",
    "_adaptive_max_pool2d",
    "contiguous",
}
# Uses of a tensor that read only its shape, not its values.
SHAPE_ONLY_NAMES = {"size", "dim"}


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every prunable layer and BatchNorm a leaf, masked or not.

    fx decides by a module's class (torch.nn classes are leaves); a mask puts a module in a
    generated class, and a user's subclass of ``nn.Linear`` would be traced through before
    masking and be a leaf after it. Here both are leaves, so the graph does not change."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*LAYERS, _BatchNorm)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` tracing (prunable layers and BatchNorms as leaves) with an error that says
    what to do when it fails."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx ({e}); "
            "its forward has data-dependent control flow"
        ) from e
    return fx.GraphModule(model, graph)


def op_name(node: fx.Node) -> str:
    """A short name for what a node does: the function or method name."""
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def is_shape_query(node: fx.Node) -> bool:
    """True for ``x.size(...)``, ``x.dim()`` and ``x.shape``: they do not read the values."""
    if node.op == "call_method" and node.target in SHAPE_ONLY_NAMES:
        return True
    return (
        node.op == "call_function" and op_name(node) == "getattr" and node.args[1:2] == ("shape",)
    )


def following_batchnorms(model: nn.Module) -> dict[str, str]:
    """Map each Linear/conv layer to the BatchNorm that alone consumes its output.

    Uses the fx graph. If the model cannot be traced, no BatchNorm is paired (module
    order would be a guess, and a wrong guess masks the wrong BatchNorm), with a warning.
    """
    modules = dict(model.named_modules())
    found = {}
    try:
        graph = trace(model).graph
    except ValueError as e:
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules.values()):
            warnings.warn(
                f"{e}. The BatchNorms after pruned layers are left unmasked, so a pruned unit "
                "still outputs the BatchNorm's shift (beta).",
                stacklevel=3,
            )
        return found
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), LAYERS):
            users = list(node.users)
            if (
                len(users) == 1
                and users[0].op == "call_module"
                and calls.count(users[0].target) == 1
                and isinstance(modules.get(users[0].target), nn.modules.batchnorm._BatchNorm)
            ):
                found[node.target] = users[0].target  # a BatchNorm used twice belongs to neither
    return found


def output_layers(model: nn.Module) -> set[str]:
    """The Linear/conv layers whose output reaches the model's output without passing through
    another such layer: their units are the model's outputs (a classifier's classes)."""
    if isinstance(model, LAYERS):
        return {""}  # a lone layer: its output is the model's
    modules = dict(model.named_modules())
    graph = trace(model).graph
    found = set()
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), LAYERS):
            todo, seen = list(node.users), set()
            while todo:
                user = todo.pop()
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "output":
                    found.add(node.target)
                    break
                if not (user.op == "call_module" and isinstance(modules.get(user.target), LAYERS)):
                    todo.extend(user.users)
    return found


def flatten_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``"flatten"`` for a flatten that keeps the batch dimension ((N, C, H, W) -> (N, C*H*W)),
    ``"hard-coded"`` for a flattening ``view``/``reshape`` with a fixed size (it would break once
    channels are removed), ``None`` for anything else."""
    if node.op == "call_module":
        m = modules[node.target]
        keeps_batch = isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
        return "flatten" if keeps_batch else None
    name = op_name(node)
    if name == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return "flatten" if (start, end) == (1, -1) else None
    if name in ("view", "reshape") and node.op == "call_method":
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        if len(sizes) == 2 and sizes[1] == -1 and not isinstance(sizes[0], int):
            return "flatten"  # x.view(x.size(0), -1)
        if len(sizes) == 2 and all(isinstance(v, int) for v in sizes):  # x.view(-1, 400)
            return "hard-coded"
    return None


def unit_axis(module: nn.Module) -> int:
    """The weight axis of a layer's output units: 0, but 1 for a transposed convolution."""
    return 1 if isinstance(module, _ConvTransposeNd) else 0


def is_zero_preserving(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True for element-wise or pooling steps that keep a zero channel zero."""
    if node.op == "call_module":
        return isinstance(modules[node.target], ZERO_PRESERVING_MODULES)
    return node.op in ("call_function", "call_method") and op_name(node) in ZERO_PRESERVING_NAMES


def first_arg_is(node: fx.Node, source: fx.Node) -> bool:
    """True when ``source`` flows into ``node`` only as its first (data) argument."""
    others = list(node.args[1:]) + list(node.kwargs.values())
    return bool(node.args) and node.args[0] is source and all(o is not source for o in others)
