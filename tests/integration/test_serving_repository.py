"""The model repository (both targets), the image checks and the guarded preprocess step,
without a server."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from tritonclient.grpc import model_config_pb2 as mc

from marrowdx import config, contract
from marrowdx.image_checks import ImageLimits, ImageRejected, check_encoded_image
from marrowdx.serving import repository
from marrowdx.serving.guarded_preprocess import GuardedPreprocessor, Preprocessed, Rejected
from marrowdx.serving.model_config import config_tensors, load_config

M = config.MODELS


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    from tests.helpers import onnx_graphs

    folder = tmp_path_factory.mktemp("onnx")
    onnx_graphs.write_all(folder)
    return folder


@pytest.mark.parametrize("target", contract.TARGETS)
def test_source_configs_follow_the_tensor_contract(target: str) -> None:
    """Read by protobuf, the parser Triton uses; field by field against the table (the
    contract's own check, tests/unit/test_contract.py, reports the differences)."""
    src = repository.source_repository()
    for name, spec in contract.MODELS.items():
        path = src / name / spec.config_path(target)
        cfg = load_config(path)
        inputs, outputs = spec.config_io(target)
        assert cfg.name == name
        assert config_tensors(cfg.input) == inputs, f"{path}: inputs"
        assert config_tensors(cfg.output) == outputs, f"{path}: outputs"
        assert cfg.max_batch_size > 0, f"{path}: must batch"
        if name != M.pipeline:
            assert cfg.HasField("dynamic_batching"), (
                f"{path}: every batchable model batches dynamically"
            )


def test_ensemble_routes_every_member_output() -> None:
    cfg = load_config(repository.source_repository() / M.pipeline / "config.pbtxt")
    steps = [s.model_name for s in cfg.ensemble_scheduling.step]
    assert steps == list(contract.PIPELINE.steps)
    produced = {v for s in cfg.ensemble_scheduling.step for v in s.output_map.values()}
    assert {o.name for o in cfg.output} <= produced


def test_cpu_build_is_complete_and_idempotent(tmp_path: Path, onnx_dir: Path) -> None:
    out = tmp_path / "repo"
    first = repository.build_repository(out, "cpu", onnx_dir=onnx_dir)
    assert first.changed and not first.pending
    assert repository.missing_artifacts(out) == []
    for name in (M.preprocess, *contract.EXPORTED_MODELS):
        assert load_config(out / name / "config.pbtxt").backend == "python"
        assert (out / name / "1" / "model.py").exists()
    second = repository.build_repository(out, "cpu", onnx_dir=onnx_dir)
    assert second.written == [], "a second build with nothing changed must write nothing"


def test_gpu_build_uses_dali_and_tensorrt_with_the_same_names(
    tmp_path: Path, onnx_dir: Path
) -> None:
    out = tmp_path / "gpu"
    result = repository.build_repository(out, "gpu", onnx_dir=onnx_dir)
    pre = load_config(out / M.preprocess / "config.pbtxt")
    assert pre.backend == "dali"
    assert (out / M.preprocess / "1" / "dali.py").exists()
    assert not (out / M.preprocess / "1" / "model.py").exists()
    for name in contract.EXPORTED_MODELS:
        cfg = load_config(out / name / "config.pbtxt")
        assert cfg.platform == "tensorrt_plan"
        assert all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group)
        assert (out / name / "1" / "model.onnx").exists()
    assert all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in pre.instance_group)
    assert len(result.pending) == 3 and all("model.plan" in p for p in result.pending)
    assert repository.build_repository(out, "gpu", onnx_dir=onnx_dir).written == []


def test_gpu_dali_file_exposes_the_shared_pipeline(tmp_path: Path, onnx_dir: Path) -> None:
    """The DALI backend finds exactly one @autoserialize pipeline in dali.py, built from the
    vendored marrowdx.preprocess (serializing it needs CUDA: done by the backend on the GPU)."""
    import importlib.util

    from nvidia.dali._utils.autoserialize import _discover_autoserialize

    out = tmp_path / "gpu"
    repository.build_repository(out, "gpu", onnx_dir=onnx_dir)
    path = out / M.preprocess / "1" / "dali.py"
    spec = importlib.util.spec_from_file_location("marrowdx_dali_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = _discover_autoserialize(module, visited=[])
    assert len(found) == 1
    vendored = out / M.preprocess / "1" / repository.VENDOR_DIR / "marrowdx" / "preprocess.py"
    assert vendored.read_bytes() == (Path(config.__file__).parent / "preprocess.py").read_bytes()


def test_gpu_build_refuses_to_overwrite_the_source_configs(onnx_dir: Path) -> None:
    with pytest.raises(repository.RepositoryError, match="outside"):
        repository.build_repository(repository.source_repository(), "gpu", onnx_dir=onnx_dir)


# ----------------------------------------------------------------------------- images
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _field(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"GIF89a" + bytes(100), "not an image"),
        (_encode(Image.fromarray(_field(8, 300)), "PNG"), "too small"),
        (_encode(Image.fromarray(_field()), "JPEG")[:40], "corrupt"),
    ],
)
def test_image_checks_name_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(ImageRejected, match=message):
        check_encoded_image(data)


def test_image_checks_refuse_declared_dimensions_before_decoding() -> None:
    png = _encode(Image.fromarray(_field()), "PNG")
    # Rewrite the IHDR width/height to 60000 x 60000 (valid CRC) without touching the data.
    ihdr = b"IHDR" + (60000).to_bytes(4, "big") * 2 + png[24:29]
    bomb = png[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + png[33:]
    with pytest.raises(ImageRejected, match="too large"):
        check_encoded_image(bomb)
    with pytest.raises(ImageRejected, match="bytes"):
        check_encoded_image(png, ImageLimits(max_bytes=len(png) - 1))


def test_guarded_preprocess_rejects_corrupt_data_before_dali() -> None:
    """The byte checks catch broken scan data, so DALI never sees it (no rebuild needed)."""
    good = [_encode(Image.fromarray(_field(seed=i)), "JPEG") for i in range(2)]
    corrupt = good[0][:600] + bytes(300) + good[0][900:]  # header fine, scan data broken
    pre = GuardedPreprocessor(max_batch_size=4)
    mixed = pre([good[0], corrupt, good[1]])
    assert isinstance(mixed[1], Rejected) and "corrupt" in mixed[1].reason
    assert pre.rebuilds == 0
    assert all(isinstance(r, Preprocessed) for r in (mixed[0], mixed[2]))


def test_guarded_preprocess_isolates_a_dali_failure_and_recovers(monkeypatch) -> None:
    """Should DALI still raise on data the checks passed, the pipeline is rebuilt and only
    the culprit fails (the checks are switched off here to reach that path)."""
    from marrowdx.serving import guarded_preprocess

    monkeypatch.setattr(guarded_preprocess, "check_encoded_image", lambda data, limits: None)
    good = [_encode(Image.fromarray(_field(seed=i)), "JPEG") for i in range(3)]
    corrupt = good[0][:600] + bytes(300) + good[0][900:]  # header fine, scan data broken
    pre = GuardedPreprocessor(max_batch_size=4)
    reference = pre(good)
    mixed = pre([good[0], corrupt, good[1], good[2]])
    assert isinstance(mixed[1], Rejected) and "decode" in mixed[1].reason
    assert pre.rebuilds >= 1
    for got, want in zip([mixed[0], mixed[2], mixed[3]], reference, strict=True):
        assert isinstance(got, Preprocessed)
        np.testing.assert_array_equal(got.pixels, want.pixels)
    again = pre(good)  # the rebuilt pipeline gives the same result as before
    np.testing.assert_array_equal(again[0].pixels, reference[0].pixels)


def test_odd_but_valid_images_come_out_as_rgb_like_pillow_sees_them() -> None:
    """DALI converts these itself (so the preprocess model needs no Pillow fallback): the
    result equals Pillow's exif_transpose + convert("RGB") of the same file."""
    rgb = _field()
    exif_img = Image.fromarray(rgb)
    exif = exif_img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    cases = {
        "grayscale": _encode(Image.fromarray(rgb[..., 0]), "PNG"),
        "rgba": _encode(
            Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)])), "PNG"
        ),
        "gray16": _encode(Image.fromarray(rgb[..., 1].astype(np.uint16) * 257), "PNG"),
        "cmyk": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "exif_rotated": _encode(exif_img, "JPEG", exif=exif.tobytes(), quality=95),
        "palette": _encode(Image.fromarray(rgb).convert("P"), "PNG"),
    }
    pre = GuardedPreprocessor(max_batch_size=8)
    for name, data in cases.items():
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        if img.mode.startswith("I"):
            img = Image.fromarray((np.asarray(img) / 257).round().astype(np.uint8))
        as_pillow = _encode(img.convert("RGB"), "PNG")
        got, want = pre([data, as_pillow])
        assert isinstance(got, Preprocessed), f"{name}: {got}"
        np.testing.assert_array_equal(got.image_size, [img.height, img.width], err_msg=name)
        np.testing.assert_allclose(  # one grey level of rounding
            got.pixels.astype(int), want.pixels.astype(int), atol=1, err_msg=name
        )
