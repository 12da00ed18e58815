"""Model graph as JSON and as a picture; the per-layer report as a chart (matplotlib, no graphviz needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from components.quantize.engine import Precision, QuantEngine
from components.quantize.errors import QuantizeError
from components.quantize.graph import WEIGHTED_KINDS
from components.quantize.inspector import InspectorSession, ModelReport

_KIND_COLOURS = {"conv2d": "#4c72b0", "linear": "#4c72b0", "leaky_relu": "#55a868", "relu": "#55a868",
                 "silu": "#55a868", "sigmoid": "#55a868", "add": "#c44e52", "cat": "#dd8452"}
_PASS_COLOUR = "#8c8c8c"


class NodeScales(BaseModel):
    inputs: list[float | None]
    output: float | None
    weight: list[float] | None = None


class GraphNode(BaseModel):
    name: str
    index: int = Field(description="execution order; -1 for the model input")
    op: str
    kind: str
    target: str
    input_shapes: list[list[int]]
    output_shape: list[int]
    param_count: int
    precision: str
    scales: NodeScales


class GraphEdge(BaseModel):
    source: str
    target: str
    shape: list[int] = Field(description="shape of the tensor flowing along the edge")


class ModelGraph(BaseModel):
    """Nodes in execution order (the input first) and data edges between them."""

    input: str
    output: str
    calibrator: str
    nodes: list[GraphNode]
    edges: list[GraphEdge]


def model_graph(engine: QuantEngine, example: torch.Tensor,
                precision: str | Precision | Sequence[str | Precision] = "int8") -> ModelGraph:
    """Graph of ``engine``'s model with shapes from a float run of ``example`` (Bx3xHxW) and per-node scales."""
    graph = engine.graph
    shapes: dict[str, list[int]] = {}

    def record(name: str, tensor: torch.Tensor) -> None:
        shapes[name] = list(tensor.shape)

    try:
        graph.run_float(example.float(), record)
    except RuntimeError as exc:
        raise QuantizeError(f"example of shape {list(example.shape)} does not fit the model: {exc}") from exc
    precisions = engine.precisions(precision)
    nodes = [GraphNode(name=graph.input_name, index=-1, op="input", kind="input", target=graph.input_name,
                       input_shapes=[], output_shape=shapes[graph.input_name], param_count=0, precision="float",
                       scales=NodeScales(inputs=[], output=engine.tensor_scale(graph.input_name)))]
    edges: list[GraphEdge] = []
    for layer in graph.layers:
        count, weight = 0, None
        if layer.node.op == "call_module":
            count = sum(p.numel() for p in graph.module(layer).parameters())
        if layer.kind in WEIGHTED_KINDS:
            weight = [float(s) for s in engine.weights(layer.index).scale]
        nodes.append(GraphNode(
            name=layer.name, index=layer.index, op=layer.op, kind=layer.kind, target=layer.target,
            input_shapes=[shapes[n] for n in layer.inputs], output_shape=shapes[layer.name], param_count=count,
            precision=precisions[layer.index].value,
            scales=NodeScales(inputs=[engine.tensor_scale(n) for n in layer.inputs],
                              output=engine.tensor_scale(layer.name), weight=weight)))
        edges += [GraphEdge(source=n, target=layer.name, shape=shapes[n]) for n in layer.inputs]
    return ModelGraph(input=graph.input_name, output=graph.output_name, calibrator=engine.calibration.method,
                      nodes=nodes, edges=edges)


def _layout(graph: ModelGraph) -> dict[str, tuple[float, float]]:
    """Rows by longest path from the input; within a row, nodes keep their first parent's column."""
    depth: dict[str, int] = {graph.input: 0}
    parents: dict[str, list[str]] = {}
    for e in graph.edges:
        parents.setdefault(e.target, []).append(e.source)
    for node in graph.nodes[1:]:
        depth[node.name] = 1 + max((depth[p] for p in parents.get(node.name, [])), default=0)
    column: dict[str, int] = {graph.input: 0}
    taken: dict[int, set[int]] = {}
    for node in graph.nodes:
        ps = parents.get(node.name, [])
        col = column[ps[0]] if ps else 0
        row = depth[node.name]
        while col in taken.setdefault(row, set()):
            col += 1
        taken[row].add(col)
        column[node.name] = col
    return {name: (float(column[name]), -float(depth[name])) for name in depth}


def render_graph(graph: ModelGraph, path: Path) -> Path:
    """Draw ``graph`` (boxes coloured by kind, labelled with op, shape and precision) into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    pos = _layout(graph)
    cols = max(x for x, _ in pos.values()) + 1
    rows = -min(y for _, y in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(2.6 * cols + 1, 0.62 * rows + 1))
    for e in graph.edges:
        (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
        ax.annotate("", xy=(x1, y1 + 0.22), xytext=(x0, y0 - 0.22),
                    arrowprops={"arrowstyle": "->", "color": "#555555", "lw": 0.7,
                                "connectionstyle": "arc3,rad=0.0" if x0 == x1 else "arc3,rad=0.15"})
    for node in graph.nodes:
        x, y = pos[node.name]
        colour = _KIND_COLOURS.get(node.kind, _PASS_COLOUR if node.kind != "input" else "#333333")
        ax.add_patch(FancyBboxPatch((x - 0.45, y - 0.2), 0.9, 0.4, boxstyle="round,pad=0.02", fc=colour,
                                    ec="black", lw=0.5, alpha=0.9))
        shape = "x".join(str(s) for s in node.output_shape[1:])
        label = f"{node.name}\n{node.op} {shape} {node.precision}"
        ax.text(x, y, label, ha="center", va="center", fontsize=5.5, color="white")
    ax.set_xlim(-0.6, cols - 0.4)
    ax.set_ylim(-rows + 0.4, 0.6)
    ax.axis("off")
    ax.set_title(f"model graph ({len(graph.nodes) - 1} layers, calibrator {graph.calibrator})", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_report(report: ModelReport, path: Path, *, sqnr_cap: float = 80.0) -> Path:
    """Per-layer SQNR chart: bars = the layer alone (local), line = accumulated through the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def capped(value: float | None) -> float:
        return sqnr_cap if value is None else min(value, sqnr_cap)

    idx = [r.index for r in report.layers]
    local = [capped(r.local_error.sqnr_db) if r.local_error else float("nan") for r in report.layers]
    accumulated = [capped(r.error.sqnr_db) if r.error else float("nan") for r in report.layers]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.18 * len(idx) + 2), 4.5))
    ax.bar(idx, local, color=[_KIND_COLOURS.get(r.kind, _PASS_COLOUR) for r in report.layers], alpha=0.8,
           label="layer alone (local SQNR)")
    ax.plot(idx, accumulated, color="black", marker=".", lw=1, label="accumulated SQNR")
    ax.set_xticks(idx)
    ax.set_xticklabels([r.name for r in report.layers], rotation=90, fontsize=5)
    ax.set_ylabel(f"SQNR vs float (dB, capped at {sqnr_cap:g})")
    out = report.output_error.sqnr_db if report.output_error else None
    title = f"per-layer quantization error ({report.calibrator}); output SQNR " + (
        f"{out:.1f} dB" if out is not None else "exact")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def layer_picture(session: InspectorSession, index: int, which: str, path: Path, *, max_channels: int = 16) -> Path:
    """Picture of layer ``index``'s ``input`` (first input), ``output``, ``weight`` or ``error`` as a PNG.

    Feature maps (1xCxHxW) show their first ``max_channels`` channels as a grid; ``error`` is the output
    minus the float reference (same grid, diverging colours); weights show each output channel's kernel
    averaged over input channels (conv) or the whole matrix (linear); other tensors a 2-D heat map.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if which not in ("input", "output", "weight", "error"):
        raise QuantizeError(f"which must be 'input', 'output', 'weight' or 'error', got {which!r}")
    layer = session.graph.layer(index)
    session.inspect(index, local=False)  # raises the usual errors when the layer has not run
    if which == "weight":
        tensor = session.engine.weights(index).q.double() * session.engine.weights(index).scale.view(
            (-1,) + (1,) * (session.engine.weights(index).q.ndim - 1))
        grid = tensor.mean(dim=1) if tensor.ndim == 4 else tensor[None]  # (C_out, k, k) or (1, out, in)
    else:
        tensor = session.tensor(layer.inputs[0] if which == "input" else layer.name)
        if which == "error":
            tensor = tensor - session.reference(layer.name)
        tensor = tensor[0] if tensor.ndim >= 3 else tensor  # drop the batch of one
        grid = tensor if tensor.ndim == 3 else tensor.reshape(1, tensor.shape[0], -1)
    grid = grid[:max_channels].detach().double()
    n = grid.shape[0]
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    limit = float(grid.abs().max()) or 1.0
    cmap, vmin = ("coolwarm", -limit) if which in ("error", "weight") or float(grid.min()) < 0 else ("viridis", 0.0)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(grid[i].numpy(), cmap=cmap, vmin=vmin, vmax=limit, interpolation="nearest")
            ax.set_title(f"ch {i}" if grid.ndim == 3 and n > 1 else "", fontsize=7)
    fig.suptitle(f"layer {index} {layer.name} ({layer.op}, {session.precisions[index].value}): {which}", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
