"""TensorRT engines Triton will load: optimisation profiles come from the config that serves
the engine, and one engine-fit rule decides where a plan may run.

TensorRT cannot be installed here, so the builder is replaced by a recording fake: what is
checked is what marrowdx asks TensorRT for (profile shapes per input), not TensorRT itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from marrowdx import config, contract, engine_fit, resources
from marrowdx.errors import ExportError
from marrowdx.export import tensorrt_build
from marrowdx.serving.model_config import load_config

SOURCES = resources.model_repository_sources()


def _max_batch(cfg: Path) -> int:
    return load_config(cfg).max_batch_size


def _plan_models() -> list[str]:
    """Every model whose gpu config serves a TensorRT engine."""
    return [
        name
        for name in sorted(p.name for p in SOURCES.iterdir() if p.is_dir())
        if (SOURCES / name / contract.GPU_CONFIG).exists()
        and load_config(SOURCES / name / contract.GPU_CONFIG).platform == "tensorrt_plan"
    ]


def test_every_engine_profile_reaches_its_serving_configs_max_batch_size() -> None:
    plans = _plan_models()
    assert set(plans) == {config.MODELS.detector, config.MODELS.classifier, config.MODELS.diagnosis}
    for name in plans:
        served = _max_batch(SOURCES / name / contract.GPU_CONFIG)
        profile = tensorrt_build.batch_profile(name)
        assert profile.max == served, name
        assert 1 == profile.min <= profile.opt <= profile.max
        # the bug this guards against: the cpu config's smaller limit shaping the engine
        assert _max_batch(SOURCES / name / contract.CPU_CONFIG) <= served


def test_max_batch_may_raise_but_never_lower_the_profile() -> None:
    name = config.MODELS.classifier
    served = tensorrt_build.batch_profile(name).max
    assert tensorrt_build.batch_profile(name, served * 2).max == served * 2
    with pytest.raises(ExportError, match="would refuse"):
        tensorrt_build.batch_profile(name, served - 1)
    with pytest.raises(ExportError, match="not a TensorRT engine"):
        tensorrt_build.batch_profile(config.MODELS.preprocess)


class _FakeTensorRT:
    """The slice of the TensorRT Python API build_engine uses, recording profile shapes."""

    __version__ = "10.5.0"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    BuilderFlag = SimpleNamespace(FP16="fp16")

    def __init__(self, inputs: list[tuple[str, tuple[int, ...]]]) -> None:
        self.inputs = inputs
        self.shapes: dict[str, tuple] = {}
        fake = self

        class Network:
            num_inputs = len(inputs)

            def get_input(self, i: int):
                return SimpleNamespace(name=inputs[i][0], shape=inputs[i][1])

        class Profile:
            def set_shape(self, name, lo, opt, hi) -> None:
                fake.shapes[name] = (lo, opt, hi)

        class BuilderConfig:
            def set_memory_pool_limit(self, *_args) -> None: ...

            def set_flag(self, *_args) -> None: ...

            def add_optimization_profile(self, _profile) -> None: ...

        class Builder:
            def __init__(self, _logger) -> None: ...

            def create_network(self, _flags):
                return Network()

            def create_builder_config(self):
                return BuilderConfig()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, _network, _config):
                return b"plan"

        class OnnxParser:
            num_errors = 0

            def __init__(self, _network, _logger) -> None: ...

            def parse(self, _data: bytes) -> bool:
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_built_engine_profiles_cover_the_served_batch_and_the_box_axis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t, k = config.TENSORS, config.MAX_DETECTIONS
    s = config.INPUT_SIZE
    # the classifier graph's inputs as the ONNX parser reports them: -1 for dynamic axes
    trt = _FakeTensorRT(
        [(t.pixels, (-1, 3, s, s)), (t.boxes, (-1, -1, 4)), (t.num_detections, (-1, 1))]
    )
    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: ("NVIDIA H200", "9.0"))
    onnx = tmp_path / "classifier.onnx"
    onnx.write_bytes(b"graph")
    profile = tensorrt_build.batch_profile(config.MODELS.classifier)
    plan = tensorrt_build.build_engine(onnx, tmp_path / "c.plan", "classifier", profile)
    served = _max_batch(SOURCES / config.MODELS.classifier / contract.GPU_CONFIG)
    assert trt.shapes[t.pixels][2] == (served, 3, s, s)
    # BOXES arrive at the contract's fixed K (Triton's config); the graph cuts them itself
    assert trt.shapes[t.boxes] == ((1, k, 4), (profile.opt, k, 4), (served, k, 4))
    side = json.loads(tensorrt_build.sidecar_path(plan).read_text())
    assert side["batch_profile"]["max"] == served and side["compute_capability"] == "9.0"


H200 = engine_fit.EngineHost("NVIDIA H200", "10.5.0.18", "9.0")


def test_one_engine_fit_rule() -> None:
    fit = engine_fit.fit_problems
    assert fit(H200, engine_fit.EngineHost("NVIDIA H200", "10.5.0", "9.0")) == []
    assert fit(H200, engine_fit.EngineHost("NVIDIA H200", "10.5.0", "")) == []  # unknown cc
    (gpu,) = fit(H200, engine_fit.EngineHost("NVIDIA L4", "10.5.0", "8.9"), "this pod")[:1]
    assert "'NVIDIA H200'" in gpu and "this pod has 'NVIDIA L4'" in gpu
    assert len(fit(H200, engine_fit.EngineHost("NVIDIA L4", "10.5.0", "8.9"))) == 2
    (trt,) = fit(H200, engine_fit.EngineHost("NVIDIA H200", "10.6.0", "9.0"))
    assert "10.5.0.18" in trt and "10.6.0" in trt


def test_export_and_deploy_script_share_the_rule(tmp_path: Path) -> None:
    """tensorrt_build accepts what the fit rule accepts (another build number of the same
    release) and refuses with the rule's words."""
    plan = tmp_path / "d.plan"
    plan.write_bytes(b"x")
    info = tensorrt_build.EngineInfo(
        model="detector",
        precision="fp16",
        tensorrt_version=H200.tensorrt_version,
        gpu_name=H200.gpu_name,
        compute_capability=H200.compute_capability,
        batch_profile={"min": 1, "opt": 32, "max": 32},
        onnx_sha256="0" * 64,
    )
    tensorrt_build.sidecar_path(plan).write_text(json.dumps(info.__dict__))
    assert tensorrt_build.check_engine_info(plan, "10.5.0", "NVIDIA H200", "9.0") == info
    with pytest.raises(ExportError, match="built for compute capability 9.0, this host has 8.0"):
        tensorrt_build.check_engine_info(plan, "10.5.0", "NVIDIA H200", "8.0")
