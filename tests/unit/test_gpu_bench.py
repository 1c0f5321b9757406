"""``marrowdx bench --gpu``: its arithmetic, its stages and its report, on the CPU device.

No CUDA here: the bench's logic runs with the hidden ``--device cpu`` (DALI's CPU decoder,
torch fp32 without graphs) on small random models whose ONNX export is the reference, so
"agreement with ONNX Runtime" must come out exact, and a host without CUDA must be told why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marrowdx import config
from marrowdx.bench import gpu
from marrowdx.bench.workload import simulated_workload
from marrowdx.export.onnx_export import export_onnx
from marrowdx.models.checkpoints import checkpoint_metadata, save_checkpoint
from marrowdx.models.networks import (
    CellClassifier,
    CellDetector,
    ClassifierSpec,
    DetectorSpec,
    DiagnosisModel,
)
from marrowdx.serving.repository import build_repository

#: Two batches of one: enough for the overlap to have something to overlap, and quick.
IMAGES, BATCH = 2, 1


def test_class_count_tvd_and_agreement_on_known_counts() -> None:
    ref = np.array([[2, 0, 0], [1, 1, 0]], float)  # pooled 3,1,0
    same = gpu.agreement("ref", ref, ref)
    assert same.class_count_tvd == 0.0 and same.images_with_other_cell_count == 0
    other = np.array([[2, 0, 0], [1, 0, 1]], float)  # pooled 3,0,1: 1/4 moved
    got = gpu.agreement("ref", ref, other)
    assert got.class_count_tvd == pytest.approx(0.25)
    assert got.images_with_other_cell_count == 0  # same cells per image, other classes
    more = gpu.agreement("ref", ref, np.array([[2, 0, 0], [1, 1, 3]], float))
    assert more.images_with_other_cell_count == 1 and more.max_cell_difference == 3
    assert more.cells_per_image == 3.5 and more.cells_per_image_reference == 2.0
    assert gpu.class_count_tvd(np.zeros((2, 3)), np.zeros((2, 3))) == 0.0
    with pytest.raises(ValueError, match="shape"):
        gpu.agreement("ref", ref, ref[:1])


def _png(height: int, width: int, value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("height,width", [(100, 200), (1000, 333), (480, 640), (512, 512)])
def test_decoder_gives_the_served_pixels_in_the_contract_geometry(height, width) -> None:
    """The bench decodes with the served preprocessing (one definition), not a copy of it."""
    from marrowdx.preprocess import CpuPreprocessor

    data = _png(height, width, 200)
    out = gpu.pick_decoder(1, "cpu")([data])
    assert tuple(out.shape) == (1, 3, config.INPUT_SIZE, config.INPUT_SIZE)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), CpuPreprocessor(max_batch_size=1)([data])[0])
    scale = config.INPUT_SIZE / max(height, width)  # longer side to INPUT_SIZE, top-left
    rows, cols = round(height * scale), round(width * scale)
    pixels = out[0, 0].numpy()
    assert (pixels[: rows - 1, : cols - 1] == 200).all()
    assert (pixels[rows + 1 :, :] == config.LETTERBOX_FILL).all()
    assert (pixels[:, cols + 1 :] == config.LETTERBOX_FILL).all()


def _models() -> tuple[CellDetector, CellClassifier, DiagnosisModel]:
    torch.manual_seed(0)
    det = CellDetector(DetectorSpec(width4=8, width8=8, width16=8, head=8))
    with torch.no_grad():  # heatmap above the threshold: random peaks become "cells"
        det.head[-1].bias[0] = 0.0
    cls = CellClassifier(ClassifierSpec(widths=(8, 8, 8), hidden=8))
    return det.eval(), cls.eval(), DiagnosisModel().eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Random models as checkpoints (what --gpu loads) and as a built cpu repository (the
    ONNX Runtime reference), plus a few cached simulated fields."""
    root = tmp_path_factory.mktemp("gpu-bench")
    det, cls, diag = _models()
    onnx = {}
    for kind, model in (("detector", det), ("classifier", cls), ("diagnosis", diag)):
        onnx[kind] = export_onnx(model, kind, root / "onnx" / f"{kind}.onnx", {})
        meta = checkpoint_metadata(kind, "random", "0", {})
        save_checkpoint(root / "work" / "models" / "random" / f"{kind}.pt", kind, model, meta)
    repo = root / "repository"
    build_repository(
        repo, "cpu", onnx_files={getattr(config.MODELS, k): p for k, p in onnx.items()}
    )
    workload = simulated_workload(IMAGES)  # cached; the CLI reads it from its work dir
    shutil.copytree(workload.source, root / "work" / "bench-cache" / workload.source.name)
    images = workload.images
    return {"root": root, "repo": repo, "images": images, "det": det, "cls": cls}


def test_cpu_device_runs_every_stage_and_agrees_with_onnx_runtime(setup) -> None:
    plan = gpu.GpuBenchPlan(
        device="cpu", batch_size=BATCH, passes=1, reference_repository=setup["repo"]
    )
    models = gpu.TorchModels(setup["det"], setup["cls"], "cpu", fp16=False, graphs=False)
    result = gpu.run_gpu_bench(
        plan, setup["images"], gpu.pick_decoder(BATCH, "cpu"), models, fp32_models=models
    )
    assert [s.name for s in result.stages] == [
        "decode",
        "models",
        "decode then models",
        "decode overlapped with models",
    ]
    assert all(s.images == IMAGES and s.images_per_s > 0 for s in result.stages)
    ref = result.vs_onnxruntime_cpu
    assert ref is not None and ref.images == IMAGES
    assert ref.cells_per_image_reference > 0, "the random detector should find cells"
    # same weights, same decoder, fp32 both: the slot-trimmed torch path equals the ONNX one
    assert ref.images_with_other_cell_count == 0 and ref.class_count_tvd < 1e-9
    assert result.fp16_vs_fp32 is not None and result.fp16_vs_fp32.class_count_tvd == 0.0
    assert "DALI CPU decoder" in result.decoder and result.engine == "torch fp32"
    table = result.markdown()
    assert "| decode overlapped with models |" in table and "class-count TVD" in table


def test_overlapped_returns_counts_in_batch_order(setup) -> None:
    models = gpu.TorchModels(setup["det"], setup["cls"], "cpu", fp16=False, graphs=False)
    decoder = gpu.pick_decoder(BATCH, "cpu")
    batches = [list(setup["images"][i : i + BATCH]) for i in range(0, IMAGES, BATCH)]
    sequential = [models(decoder(b)) for b in batches]
    in_thread = gpu.overlapped(decoder, models, batches, "cpu")
    for a, b in zip(sequential, in_thread, strict=True):
        np.testing.assert_array_equal(a, b)


def test_overlapped_reraises_a_decoder_failure(setup) -> None:
    class Broken(gpu.Decoder):
        name = "broken"

        def __call__(self, images):
            raise RuntimeError("corrupt JPEG")

    models = gpu.TorchModels(setup["det"], setup["cls"], "cpu", fp16=False, graphs=False)
    with pytest.raises(RuntimeError, match="corrupt JPEG"):
        gpu.overlapped(Broken(), models, [list(setup["images"][:BATCH])], "cpu")


def _bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "marrowdx", "bench", "--gpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_cli_writes_json_and_table_on_the_cpu_device(setup) -> None:
    out = setup["root"] / "bench" / "gpu.json"
    proc = _bench(
        "--json", str(out), "--device", "cpu", "--gpu-images", str(IMAGES),
        "--gpu-batch", str(BATCH), "--gpu-passes", "1", "--preset", "random",
        "--work-dir", str(setup["root"] / "work"), "--repository", str(setup["repo"]),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert set(doc["stages"]) == {
        "decode",
        "models",
        "decode then models",
        "decode overlapped with models",
    }
    assert doc["vs_onnxruntime_cpu"]["class_count_tvd"] < 1e-9
    assert doc["fp16_vs_fp32"] is None  # no fp16 on the CPU test device
    assert "| models |" in Path(out.with_suffix(".md")).read_text()


def test_cli_without_weights_names_the_missing_files(tmp_path: Path) -> None:
    proc = _bench(
        "--json", str(tmp_path / "g.json"), "--device", "cpu", "--work-dir", str(tmp_path)
    )
    assert proc.returncode != 0 and "no trained weights" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: the bench would run")
def test_cli_on_a_host_without_cuda_says_why_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _bench("--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "GPU bench skipped: no CUDA device" in proc.stdout
    assert "no CUDA device" in json.loads(out.read_text())["skipped"]
