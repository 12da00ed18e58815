from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.quantize.engine import QuantEngine
from components.quantize.errors import QuantizeError
from components.quantize.visualize import ModelGraph, model_graph, render_graph


def test_graph_json_has_nodes_edges_shapes_params_and_scales(engine: QuantEngine) -> None:
    graph = model_graph(engine, torch.rand(1, 3, 64, 64))
    doc = json.loads(graph.model_dump_json())
    assert ModelGraph.model_validate(doc) == graph
    nodes = {n.name: n for n in graph.nodes}
    assert graph.nodes[0].name == "images" and graph.nodes[0].output_shape == [1, 3, 64, 64]
    assert len(graph.nodes) == len(engine.graph.layers) + 1
    stem = nodes["stem_conv"]
    assert (stem.op, stem.precision, stem.input_shapes, stem.output_shape) == (
        "Conv2d", "int8", [[1, 3, 64, 64]], [1, 16, 32, 32])
    assert stem.param_count == 16 * 3 * 9 + 16
    assert stem.scales.weight is not None and len(stem.scales.weight) == 16
    assert stem.scales.output == pytest.approx(engine.calibration.scale("stem_conv"))
    cat = nodes["cat"]
    assert cat.input_shapes == [[1, 64, 8, 8], [1, 64, 8, 8]] and cat.output_shape == [1, 128, 8, 8]
    assert {(e.source, e.target) for e in graph.edges} >= {("add_1", "cat"), ("upsample", "cat"),
                                                           ("images", "stem_conv")}
    # Every edge joins known nodes, and the source's output shape travels along it.
    for edge in graph.edges:
        assert edge.shape == nodes[edge.source].output_shape and edge.target in nodes
    assert sum(n.param_count for n in graph.nodes) == sum(
        p.numel() for p in engine.graph.graph_module.parameters())
    assert graph.output == "cat_3" and nodes["cat_3"].output_shape == [1, 64 + 16, 8]


def test_graph_picture_is_a_png(engine: QuantEngine, tmp_path: Path) -> None:
    graph = model_graph(engine, torch.rand(1, 3, 64, 64), precision="hybrid")
    assert {n.precision for n in graph.nodes[1:]} == {"hybrid"}
    path = render_graph(graph, tmp_path / "pics" / "graph.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_graph_of_a_mismatched_example_is_a_clear_error(engine: QuantEngine) -> None:
    with pytest.raises(QuantizeError, match=r"example of shape \[1, 3, 56, 56\] does not fit the model"):
        model_graph(engine, torch.rand(1, 3, 56, 56))
