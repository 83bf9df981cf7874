"""GPU checks (marked `gpu`, excluded by default): run with `pytest -m gpu` on a CUDA machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from camseg.cam import CAM, MultiScaleCAM
from camseg.models.classifier import CamClassifier

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
REPO = Path(__file__).resolve().parents[1]


def test_cam_identity_and_tta_on_cuda_in_bf16() -> None:
    torch.manual_seed(0)
    model = CamClassifier(3, "resnet50", in_channels=3, output_stride=16).cuda().eval()
    x = torch.randn(8, 3, 256, 256, device="cuda")
    with torch.no_grad():
        logits = model(x)
        raw = CAM(model, relu=False)(x)
    assert torch.allclose(raw.mean((2, 3)) + model.classifier.bias, logits, atol=1e-3)
    labels = torch.randint(0, 2, (8, 3), device="cuda").float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tta = MultiScaleCAM(CAM(model), scales=(1.0, 0.5, 1.5, 2.0), flip=True)(x, labels)
    ref = MultiScaleCAM(CAM(model), scales=(1.0, 0.5, 1.5, 2.0), flip=True)(x, labels)
    assert tta.shape == (8, 3, 256, 256) and tta.device.type == "cuda"
    assert (tta - ref).abs().max() < 0.05  # bf16 stays close to fp32 after normalisation


def test_pipeline_runs_on_gpu_with_bf16(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from camseg.pipeline import run_pipeline

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "debug=fast",
                f"paths.root_dir={tmp_path}",
                "run_name=gpu",
                "trainer=gpu",
                "trainer.accelerator=gpu",
            ],
        )
    run_pipeline(cfg)
    assert (tmp_path / "runs/gpu/seg/metrics.json").is_file()
