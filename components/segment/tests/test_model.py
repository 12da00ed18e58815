"""Segmenter presets, official-checkpoint loading (strict keys), model directories and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from segment_anything import sam_model_registry

from components.models.weights import ModelFileError
from components.segment.model import (
    SEGMENTER_PRESETS,
    SegmenterConfig,
    build_segmenter,
    load_sam_checkpoint,
    load_segmenter,
    save_segmenter,
    segmenter_config,
)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_vit_b_loads_a_checkpoint_saved_from_segment_anythings_own_builder(tmp_path: Path) -> None:
    # The real thing at full size: segment_anything builds vit_b with random weights, torch.save writes
    # its state_dict (375 MB), and our loader reads it back weights-only with strict keys.
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]()
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(reference.state_dict(), path)
    try:
        model = load_sam_checkpoint(path, "vit_b")
        expected = reference.state_dict()
        loaded = model.state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
        assert model.image_encoder.img_size == 1024 and model.pixel_mean.device.type == "cpu"
        assert not model.training
    finally:
        path.unlink()


@pytest.mark.parametrize("preset", ["vit_l", "vit_h"])
def test_vit_l_and_vit_h_load_a_checkpoint_with_the_builders_keys_and_shapes(preset: str, tmp_path: Path) -> None:
    # Full random vit_l/vit_h checkpoints are 1.2 GB and 2.5 GB. segment_anything's builder runs on the
    # meta device instead (same module tree, no memory), and every tensor of the file is a zero-stride
    # view of one scalar: a real torch.save file of a few KB with exactly the builder's keys and shapes,
    # read back through the same weights_only + strict-key path as a downloaded official checkpoint.
    with torch.device("meta"):
        reference = sam_model_registry[preset]().state_dict()
    values = {k: torch.full((), float(i % 7)).expand(v.shape) for i, (k, v) in enumerate(reference.items())}
    path = tmp_path / f"sam_{preset}_keys.pth"
    torch.save(values, path)
    assert path.stat().st_size < 1_000_000
    model = load_sam_checkpoint(str(path), preset)
    loaded = model.state_dict()
    assert _shapes(loaded) == _shapes(reference)
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert float(loaded[key].flatten()[0]) == float(values[key].flatten()[0])
    assert model.image_encoder.pos_embed.device.type == "cpu"


@pytest.mark.parametrize("preset", ["vit_b", "vit_l", "vit_h"])
def test_official_presets_build_the_same_module_tree_as_segment_anything(preset: str) -> None:
    with torch.device("meta"):
        ours = build_segmenter(segmenter_config(preset)).state_dict()
        theirs = sam_model_registry[preset]().state_dict()
    assert list(ours) == list(theirs)
    assert _shapes(ours) == _shapes(theirs)


def test_a_checkpoint_of_another_preset_is_rejected_listing_missing_and_unexpected_keys(tmp_path: Path) -> None:
    with torch.device("meta"):
        vit_l = sam_model_registry["vit_l"]().state_dict()
    path = tmp_path / "vit_l.pth"
    torch.save({k: torch.zeros(()).expand(v.shape) for k, v in vit_l.items()}, path)
    with pytest.raises(ModelFileError) as info:
        load_sam_checkpoint(path, "vit_b")
    message = str(info.value)
    assert str(path) in message and "'vit_b'" in message
    assert "0 missing" in message and "unexpected [image_encoder.blocks.12." in message


def test_strict_keys_name_missing_unexpected_and_mismatched_shapes(tmp_path: Path) -> None:
    config = segmenter_config("tiny")
    state = build_segmenter(config).state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=r"1 missing \[mask_decoder\.iou_token\.weight\], "
                                             r"1 unexpected \[extra\.weight\]"):
        load_sam_checkpoint(path, "tiny")
    state = build_segmenter(config).state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=r"mask_decoder\.iou_token\.weight: file \(3, 3\) vs model \(1, 64\)"):
        load_sam_checkpoint(path, "tiny")


def test_bad_checkpoint_paths_and_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=re.escape("nope.pth: SAM checkpoint file not found")):
        load_sam_checkpoint(tmp_path / "nope.pth", "vit_b")
    with pytest.raises(ModelFileError, match="only local paths and s3:// URIs"):
        load_sam_checkpoint("https://example.com/sam_vit_b.pth", "vit_b")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match=re.escape("garbage.pth: not a readable weights-only torch checkpoint")):
        load_sam_checkpoint(garbage, "tiny")
    # A pickled object that is not a plain state_dict is refused by weights_only (nothing is executed).
    evil = tmp_path / "evil.pth"
    torch.save({"model": SegmenterConfig()}, evil)
    with pytest.raises(ModelFileError, match=re.escape("evil.pth: not a readable weights-only torch checkpoint")):
        load_sam_checkpoint(evil, "tiny")
    nested = tmp_path / "nested.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, nested)
    with pytest.raises(ModelFileError, match="expected a state_dict"):
        load_sam_checkpoint(nested, "tiny")


def test_unknown_preset_and_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown segmenter preset 'vit_x'; allowed: \['tiny', 'vit_b'"):
        segmenter_config("vit_x")
    with pytest.raises(ValueError, match="official input size 1024; got img_size=512"):
        segmenter_config("vit_b", img_size=512)
    with pytest.raises(ValueError, match=re.escape("takes img_size in 32..256, got 512")):
        segmenter_config("tiny", img_size=512)
    with pytest.raises(ValueError, match="multiple of patch_size=8, got 100"):
        segmenter_config("tiny", img_size=100)
    with pytest.raises(ValueError, match="unknown keys"):
        SegmenterConfig.from_dict({"preset": "tiny", "depth": 3})
    assert SEGMENTER_PRESETS == ("tiny", "vit_b", "vit_l", "vit_h")


def test_tiny_model_dir_round_trips_and_predicts_the_same(tmp_path: Path) -> None:
    torch.manual_seed(1)
    config = segmenter_config("tiny", img_size=96)
    model = build_segmenter(config)
    directory = save_segmenter(model, config, tmp_path / "m")
    doc = json.loads((directory / "config.json").read_text())
    assert doc["kind"] == "segmenter" and doc["config"]["img_size"] == 96
    loaded, loaded_config = load_segmenter(directory)
    assert loaded_config == config and SegmenterConfig.from_dict(config.to_dict()) == config
    image = torch.rand(1, 3, 96, 96) * 255
    with torch.inference_mode():
        a = model.image_encoder(model.preprocess(image[0])[None])
        b = loaded.image_encoder(loaded.preprocess(image[0])[None])
    assert torch.equal(a, b)
    assert a.shape == (1, 64, 12, 12)


def test_model_dir_errors_name_the_file(tmp_path: Path) -> None:
    config = segmenter_config("tiny")
    directory = save_segmenter(build_segmenter(config), config, tmp_path / "m")
    state = load_file(str(directory / "model.safetensors"))
    state.pop("prompt_encoder.not_a_point_embed.weight")
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"model\.safetensors: keys do not match a 'tiny' segmenter: "
                                             r"1 missing \[prompt_encoder\.not_a_point_embed\.weight\]"):
        load_segmenter(directory)
    (directory / "config.json").write_text(json.dumps({"kind": "detector", "format_version": 1, "config": {}}))
    with pytest.raises(ModelFileError, match="field 'kind' must be 'segmenter', got 'detector'"):
        load_segmenter(directory)
    with pytest.raises(ModelFileError, match=re.escape("config.json: missing")):
        load_segmenter(tmp_path / "empty")
