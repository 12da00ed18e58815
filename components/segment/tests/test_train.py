"""Segmenter training: SAM loss, reproducibility, checkpoint/resume, fine-tune mode, MLflow + registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.segment.model import build_segmenter, load_segmenter, save_segmenter, segmenter_config
from components.segment.train import SegTrainConfig, SegTrainConfigError, sam_loss, train_segmenter

TINY = {"img_size": 96, "epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 0.0}


def test_sam_loss_takes_the_best_multimask_token_and_regresses_iou() -> None:
    config = SegTrainConfig()
    target = torch.zeros((1, 32, 32), dtype=torch.bool)
    target[0, 8:24, 8:24] = True
    good = torch.where(torch.nn.functional.interpolate(target[None].float(), size=(16, 16), mode="area") > 0.5,
                       10.0, -10.0)[0, 0]
    bad = torch.full((16, 16), -10.0)
    # token 0 right, the best multimask token (2) right, the others wrong; IoU predictions exact
    low_res = torch.stack([good, bad, good, bad])[None]
    exact = sam_loss(low_res, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), target, config, 32)
    assert float(exact.iou) == pytest.approx(0.0, abs=1e-6)
    assert float(exact.dice) < 0.01 and float(exact.total) < 0.05
    # the same masks in another multimask slot cost the same: only the best of 1..3 counts
    moved = sam_loss(torch.stack([good, good, bad, bad])[None], torch.tensor([[1.0, 1.0, 0.0, 0.0]]), target,
                     config, 32)
    assert float(moved.total) == pytest.approx(float(exact.total), abs=1e-6)
    # a wrong single-mask token (0) always costs
    wrong0 = sam_loss(torch.stack([bad, good, bad, bad])[None], torch.tensor([[0.0, 1.0, 0.0, 0.0]]), target,
                      config, 32)
    assert float(wrong0.total) > 1.0
    # IoU head off by 0.5 on every token -> MSE 0.25
    off = sam_loss(low_res, torch.tensor([[0.5, 0.5, 0.5, 0.5]]), target, config, 32)
    assert float(off.iou) == pytest.approx(0.25, abs=1e-6)


def test_training_is_reproducible_and_the_loss_decreases(tiny_dataset: Path, tmp_path: Path) -> None:
    config = SegTrainConfig(**TINY)  # type: ignore[arg-type]
    a = train_segmenter(tiny_dataset, tmp_path / "a", config, track=False, progress=False)
    b = train_segmenter(tiny_dataset, tmp_path / "b", config, track=False, progress=False)
    wa = load_file(str(a.model_dir / "model.safetensors"))
    wb = load_file(str(b.model_dir / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert a.history[1]["loss"] < a.history[0]["loss"]
    assert set(a.metrics) == {"miou_point", "miou_box"} and 0.0 <= a.metrics["miou_box"] <= 1.0
    assert {"val_miou_point", "val_miou_box", "epoch_time_s", "loss_focal", "loss_dice", "loss_iou"} <= set(
        a.history[-1])
    assert {p.name for p in a.artifacts} == {"sample_overlays_box.png", "sample_overlays_point.png",
                                             "training_curves.png"}
    model, config_back = load_segmenter(a.model_dir)
    assert config_back.img_size == 96 and not model.training
    c = train_segmenter(tiny_dataset, tmp_path / "c", SegTrainConfig(**{**TINY, "seed": 1}),  # type: ignore[arg-type]
                        track=False, progress=False)
    assert c.history[0]["loss"] != a.history[0]["loss"]


def test_rerun_resumes_from_checkpoint_and_rejects_another_recipe(tiny_dataset: Path, tmp_path: Path) -> None:
    one = SegTrainConfig(**{**TINY, "epochs": 1})  # type: ignore[arg-type]
    first = train_segmenter(tiny_dataset, tmp_path, one, track=False, progress=False)
    assert first.resumed_from_epoch == 0 and (tmp_path / "checkpoint.pt").is_file()
    again = train_segmenter(tiny_dataset, tmp_path, one, track=False, progress=False)
    assert again.resumed_from_epoch == 1 and again.history == first.history
    with pytest.raises(SegTrainConfigError, match="different recipe"):
        train_segmenter(tiny_dataset, tmp_path, SegTrainConfig(**{**TINY, "epochs": 1, "lr": 0.01}),  # type: ignore[arg-type]
                        track=False, progress=False)


def test_freeze_encoder_fine_tunes_only_prompt_encoder_and_decoder(tiny_dataset: Path, tmp_path: Path) -> None:
    config = segmenter_config("tiny", img_size=96)
    torch.manual_seed(5)
    init = save_segmenter(build_segmenter(config), config, tmp_path / "init")
    train = SegTrainConfig(**{**TINY, "epochs": 1, "freeze_encoder": True,  # type: ignore[arg-type]
                              "init_checkpoint": str(init)})
    result = train_segmenter(tiny_dataset, tmp_path / "ft", train, track=False, progress=False)
    before = load_file(str(init / "model.safetensors"))
    after = load_file(str(result.model_dir / "model.safetensors"))
    encoder = [k for k in before if k.startswith("image_encoder.")]
    decoder = [k for k in before if k.startswith("mask_decoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)


def test_bad_training_parameters_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(SegTrainConfigError, match="unknown segmenter preset 'huge'"):
        SegTrainConfig(preset="huge")
    with pytest.raises(SegTrainConfigError, match="train parameter epochs=0 is invalid: must be >= 1"):
        SegTrainConfig(epochs=0)
    with pytest.raises(SegTrainConfigError, match="official input size 1024"):
        SegTrainConfig(preset="vit_b", img_size=256)
    with pytest.raises(SegTrainConfigError, match="weights are never downloaded"):
        SegTrainConfig(init_checkpoint="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth")
    config = segmenter_config("tiny")  # 128 px, but training asks for 96
    other = save_segmenter(build_segmenter(config), config, tmp_path / "m128")
    with pytest.raises(SegTrainConfigError, match="model is tiny at 128 px, but training asks for tiny at 96 px"):
        train_segmenter(Path("unused"), tmp_path / "out",
                        SegTrainConfig(**{**TINY, "init_checkpoint": str(other)}),  # type: ignore[arg-type]
                        track=False, progress=False)
