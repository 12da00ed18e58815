"""Trace a model into an ordered list of layers (torch.fx) that the calibrators and the engine walk.

The model is deep-copied, put in eval mode, its BatchNorms folded (its ``fuse()`` when it has one, else
torch.fx's Conv2d+BatchNorm2d folding), in-place activations made out-of-place (the inspector keeps
every intermediate tensor), then traced with ``torch.fx.symbolic_trace``. ``nn.Identity`` nodes (left by
BN folding) are removed. Each remaining ``call_*`` node is one :class:`Layer`, in execution order;
tensors are named by the node that makes them.

A module with a string class attribute ``quant_kind`` is traced as one leaf layer of that kind (e.g. the
segmenter's ``"layer_norm"`` and ``"attention"`` float islands, see :mod:`components.quantize.segment`):
its internals (parameter reads, data-dependent shapes, softmax, matmuls of two activations) stay inside
one float call that the engine, the calibrators and the deployable export treat as a unit.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse as fx_fuse

from components.quantize.errors import LayerIndexError, UnsupportedLayerError

# Layer kinds. A "quantization point" produces a tensor with its own calibrated scale; a pass-through only
# moves values around, so its int8 output keeps its input's scale.
WEIGHTED_KINDS = frozenset({"conv2d", "linear"})
ACTIVATION_KINDS = frozenset({"relu", "leaky_relu", "silu", "sigmoid", "gelu"})
MERGE_KINDS = frozenset({"add", "cat"})
PASS_THROUGH_KINDS = frozenset({"upsample", "flatten", "transpose", "reshape", "permute", "max_pool2d",
                                "contiguous"})
SUPPORTED_KINDS = WEIGHTED_KINDS | ACTIVATION_KINDS | MERGE_KINDS | PASS_THROUGH_KINDS

_MODULE_KINDS: dict[type[nn.Module], str] = {
    nn.Conv2d: "conv2d", nn.Linear: "linear", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid", nn.Upsample: "upsample", nn.Flatten: "flatten", nn.MaxPool2d: "max_pool2d",
    nn.GELU: "gelu", nn.LayerNorm: "layer_norm",
}
_FUNCTION_KINDS: dict[Callable[..., Any], str] = {
    operator.add: "add", torch.add: "add", torch.cat: "cat", torch.flatten: "flatten",
    torch.transpose: "transpose", torch.reshape: "reshape", torch.permute: "permute",
    torch.relu: "relu", torch.sigmoid: "sigmoid", nn.functional.relu: "relu",
    nn.functional.leaky_relu: "leaky_relu", nn.functional.silu: "silu", nn.functional.gelu: "gelu",
}
_METHOD_KINDS = {"flatten": "flatten", "transpose": "transpose", "reshape": "reshape", "view": "reshape",
                 "permute": "permute", "contiguous": "contiguous", "add": "add", "relu": "relu",
                 "sigmoid": "sigmoid"}


@dataclass
class Layer:
    """One executable node of the traced model."""

    index: int
    name: str  # fx node name; also the name of the tensor it produces (e.g. "stage2_0_conv")
    kind: str  # one of SUPPORTED_KINDS, or "other" (float only)
    op: str  # display name: module class ("Conv2d") or function/method name ("add", "cat", "flatten")
    target: str  # module path ("stage2.0.conv") or function/method name
    inputs: list[str]  # names of the tensors it reads, in argument order
    node: fx.Node


class QuantGraph:
    """A traced, BN-folded copy of a model with its layers in execution order.

    ``run_float(images)`` runs it in float32; ``module(layer)`` gives a layer's module (weights live there,
    so edits through the inspector change them).
    """

    def __init__(self, model: nn.Module) -> None:
        model = copy.deepcopy(model).eval().requires_grad_(False)  # inference only
        fuse = getattr(model, "fuse", None)
        if callable(fuse):
            fuse()
        for module in model.modules():
            if hasattr(module, "inplace"):
                setattr(module, "inplace", False)  # noqa: B010  # keep every intermediate tensor intact
        # Models without fuse(): torch.fx folds every Conv2d -> BatchNorm2d pair after tracing.
        traced = fx.GraphModule(model, _LeafTracer().trace(model), type(model).__name__)
        fused = fx_fuse(traced, inplace=True, no_trace=True)
        assert isinstance(fused, fx.GraphModule)
        self.graph_module: fx.GraphModule = fused
        _remove_identities(self.graph_module)
        nodes = list(self.graph_module.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        outputs = [n for n in nodes if n.op == "output"]
        if len(placeholders) != 1:
            raise UnsupportedLayerError(f"model must take exactly one input tensor, its forward takes "
                                        f"{[n.name for n in placeholders]}")
        out_arg = outputs[0].args[0]
        if not isinstance(out_arg, fx.Node):
            raise UnsupportedLayerError("model must return a single tensor (got a tuple/dict output)")
        self.input_name: str = placeholders[0].name
        self.output_name: str = out_arg.name
        self.layers: list[Layer] = []
        for node in nodes:
            if node.op in ("call_module", "call_function", "call_method"):
                self.layers.append(self._make_layer(len(self.layers), node))
            elif node.op == "get_attr":
                raise UnsupportedLayerError(f"node {node.name}: reading parameters in forward is not supported")
        self._by_name = {layer.name: layer for layer in self.layers}

    def _make_layer(self, index: int, node: fx.Node) -> Layer:
        inputs: list[str] = []

        def collect(n: fx.Node) -> fx.Node:
            inputs.append(n.name)
            return n

        fx.node.map_arg((node.args, node.kwargs), collect)
        if node.op == "call_module":
            module = self.graph_module.get_submodule(str(node.target))
            declared = getattr(module, "quant_kind", None)
            kind = declared if isinstance(declared, str) else _MODULE_KINDS.get(type(module), "other")
            if kind == "upsample" and getattr(module, "mode", None) != "nearest":
                kind = "other"  # bilinear upsampling computes new values: not a pass-through
            op, target = type(module).__name__, str(node.target)
        elif node.op == "call_function":
            fn: Any = node.target
            kind = _FUNCTION_KINDS.get(fn, "other")
            op = target = getattr(fn, "__name__", str(fn))
        else:
            kind = _METHOD_KINDS.get(str(node.target), "other")
            op = target = str(node.target)
        return Layer(index=index, name=node.name, kind=kind, op=op, target=target, inputs=inputs, node=node)

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> Layer:
        """Layer ``index`` (0-based); :class:`LayerIndexError` when out of range."""
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.layers):
            raise LayerIndexError(f"layer index {index!r} out of range: the model has {len(self.layers)} layers "
                                  f"(0 .. {len(self.layers) - 1})")
        return self.layers[index]

    def by_name(self, name: str) -> Layer:
        if name not in self._by_name:
            raise LayerIndexError(f"no layer named {name!r}")
        return self._by_name[name]

    def module(self, layer: Layer) -> nn.Module:
        """The module a ``call_module`` layer runs."""
        if layer.node.op != "call_module":
            raise TypeError(f"layer {layer.index} ({layer.name}) is a {layer.op} call, not a module")
        return self.graph_module.get_submodule(layer.target)

    def run_float_layer(self, layer: Layer, env: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run ``layer`` in float on tensors looked up by name in ``env``."""
        node = layer.node
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        assert isinstance(args, tuple) and isinstance(kwargs, dict)
        if node.op == "call_module":
            return self.graph_module.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_function":
            fn: Any = node.target
            return fn(*args, **kwargs)
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)

    @torch.no_grad()
    def run_float(self, images: torch.Tensor,
                  on_tensor: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Float forward of ``images`` (Bx3xHxW); ``on_tensor(name, tensor)`` sees the input and every layer output."""
        env = {self.input_name: images}
        if on_tensor is not None:
            on_tensor(self.input_name, images)
        for layer in self.layers:
            env[layer.name] = out = self.run_float_layer(layer, env)
            if on_tensor is not None and isinstance(out, torch.Tensor):
                on_tensor(layer.name, out)
        return env[self.output_name]


class _LeafTracer(fx.Tracer):
    """torch.fx's default tracer, plus: modules declaring a ``quant_kind`` are leaves (one layer each)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_declared_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def is_declared_leaf(module: nn.Module) -> bool:
    """True for a module that declares its layer kind with a string ``quant_kind`` attribute."""
    return isinstance(getattr(module, "quant_kind", None), str)


def _remove_identities(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
