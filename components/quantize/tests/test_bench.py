"""``bench quantize`` on a tiny trained detector at 96 px: the report's shape and table, not the targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from components.quantize.bench import MODES, bench_quantize, render_latency_table, render_table
from components.quantize.calibrate import CALIBRATORS


@pytest.fixture(scope="module")
def report(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "quantize.json"
    lines: list[str] = []
    result = bench_quantize(out, model_dir=trained_model_dir, img_size=96, calib_images=8, val_images=8,
                            repeats=3, warmup=1, log=lines.append)
    assert any("generating a 16-image shapes dataset at 96 px" in line for line in lines)
    return result, out


def test_report_keys_and_types(report: tuple[dict, Path]) -> None:
    result, out = report
    assert json.loads(out.read_text()) == result
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(result["int8_speedup_b1"], float) and result["int8_speedup_b1"] > 0
    assert isinstance(result["int8_speedup_b8"], float) and result["int8_speedup_b8"] > 0
    assert result["best_calibrator"] in CALIBRATORS
    assert isinstance(result["map50_drop_best"], float)
    assert list(result["map50"]) == list(CALIBRATORS)
    for row in result["map50"].values():
        assert list(row) == list(MODES) and all(0.0 <= v <= 1.0 for v in row.values())
        assert row["float"] == result["map50_float"]  # one float model, repeated per row
    best = result["map50"][result["best_calibrator"]]["deploy"]
    assert best == max(row["deploy"] for row in result["map50"].values()) == result["map50_deploy_best"]
    assert result["map50_drop_best"] == round((result["map50_float"] - best) * 100, 3)
    for name, batch in (("b1", 1), ("b8", 8)):
        lat = result["latency"][name]
        assert lat["batch"] == batch and lat["repeats"] == 3 and lat["float_ms"] > 0 and lat["int8_ms"] > 0
        assert lat["float_cpu_ms"] > 0 and lat["int8_cpu_ms"] > 0 and isinstance(lat["speedup_cpu"], float)
        assert result[f"int8_speedup_{name}"] == lat["speedup"] == round(lat["float_ms"] / lat["int8_ms"], 3)
    assert result["setup"]["img_size"] == 96 and result["setup"]["val_images"] == 8
    assert result["setup"]["threads"] == 1 and result["setup"]["backend"] == "x86"
    assert result["meets_targets"] == {"int8_speedup_b1": result["int8_speedup_b1"] >= 2.0,
                                       "map50_drop_best": result["map50_drop_best"] <= 1.0}


def test_tables_show_every_calibrator_and_mode(report: tuple[dict, Path]) -> None:
    result, _ = report
    console = Console(record=True, width=140)
    console.print(render_table(result))
    console.print(render_latency_table(result))
    text = console.export_text()
    for mode in MODES:
        assert mode in text
    for method, row in result["map50"].items():
        line = next(line for line in text.splitlines() if line.startswith(f"│ {method} "))
        for mode in MODES:
            assert f"{row[mode] * 100:.2f}" in line
    assert f"{result['latency']['b8']['speedup']:.2f}x" in text


def test_cli_without_a_registered_model_says_so(mc_home: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    assert main(["bench", "quantize", "--out", str(tmp_path / "q.json")]) == 2
    err = capsys.readouterr().err
    assert "no model given (--model-uri) and no models:/detector@champion registered" in err
    assert not (tmp_path / "q.json").exists()
