"""deploy/scripts: the engine manifest (record / verify, with fake hosts), the gpu target
repository the engine-build Job serves, and build_engines.sh end to end with a fake GPU
toolchain.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from marrowdx import config
from tests.helpers.deploy import DEPLOY, H100, L4


# ------------------------------------------------------- engine manifest (unit, fake inputs)
def _fake_repository(root: Path) -> Path:
    for name in ("detector", "classifier", "diagnosis"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.plan").write_bytes(f"engine {name}".encode())
    (root / "preprocess" / "1").mkdir(parents=True)
    (root / "preprocess" / "1" / "dali.py").write_text("# pipeline\n")
    return root


def test_manifest_accepts_the_building_host(manifest, tmp_path: Path) -> None:
    repo = _fake_repository(tmp_path)
    info = manifest.record(repo, H100, "10.5.0.18")
    assert sorted(info.engines) == [
        f"{m}/1/model.plan" for m in ("classifier", "detector", "diagnosis")
    ]
    assert manifest.verify(repo, H100, "10.5.0.18") == []
    assert manifest.verify(repo, H100, "10.5.0") == []  # same TensorRT release, other build
    saved = json.loads((repo / manifest.BUILD_INFO).read_text())
    assert saved["gpu_name"] == H100 and saved["tensorrt_version"] == "10.5.0.18"


def test_manifest_refuses_mismatches(manifest, tmp_path: Path) -> None:
    repo = _fake_repository(tmp_path)
    manifest.record(repo, H100, "10.5.0.18")
    (gpu_problem,) = manifest.verify(repo, L4, "10.5.0.18")
    assert H100 in gpu_problem and L4 in gpu_problem
    (trt_problem,) = manifest.verify(repo, H100, "10.6.0.26")
    assert "10.5.0.18" in trt_problem and "10.6.0.26" in trt_problem
    (repo / "detector" / "1" / "model.plan").write_bytes(b"swapped engine")
    assert any(
        "detector/1/model.plan differs" in p for p in manifest.verify(repo, H100, "10.5.0.18")
    )
    assert manifest.verify(repo, None, None)  # engines but no GPU on this host


def test_manifest_reads_the_export_sidecars(manifest, tmp_path: Path) -> None:
    repo = _fake_repository(tmp_path)
    manifest.record(repo, H100, "10.5.0.18")
    sidecar = repo / "classifier" / "1" / "model.plan.json"
    sidecar.write_text(
        json.dumps({manifest.SIDECAR_GPU_KEY: L4, manifest.SIDECAR_TRT_KEY: "10.5.0.18"})
    )
    problems = manifest.verify(repo, H100, "10.5.0.18")
    assert problems == [f"classifier/1/model.plan: built on GPU {L4!r}, this pod has {H100!r}"]


def test_manifest_cli_exit_codes(manifest, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    repo = _fake_repository(tmp_path / "repo")

    def cli(command: str, gpu: str = H100) -> int:
        return manifest.main(
            [command, str(repo), "--gpu-name", gpu, "--tensorrt-version", "10.5.0"]
        )

    assert cli("verify") == 1
    assert "BUILD_INFO.json is missing" in capsys.readouterr().err
    assert cli("record") == 0
    assert cli("verify") == 0
    assert cli("verify", gpu=L4) == 1
    assert "REFUSED" in capsys.readouterr().err
    # the cpu target has no engines: nothing to check, no GPU needed
    cpu = tmp_path / "cpu"
    (cpu / "detector" / "1").mkdir(parents=True)
    assert manifest.main(["verify", str(cpu)]) == 0
    assert manifest.main(["verify", str(tmp_path / "unpublished")]) == 1


# ------------------------------------------------ gpu target repository (what the Job serves)
def _build(target: str, out: Path, onnx_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "marrowdx",
        "build",
        "--target",
        target,
        "--out",
        str(out),
        "--onnx-dir",
        str(onnx_dir),
        "--work-dir",
        str(onnx_dir.parent / "work"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"


def _configs(repo: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        out[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return out


@pytest.fixture(scope="module")
def target_repositories(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("onnx", reason="synthetic ONNX graphs need the onnx package")
    from tests.helpers import onnx_graphs

    root = tmp_path_factory.mktemp("targets")
    # tiny graphs with the contract's names and shapes: no training needed to check configs
    onnx_dir = root / "onnx"
    onnx_dir.mkdir()
    for name, path in onnx_graphs.write_all(onnx_dir).items():
        assert path.name == f"{name}.onnx"
    _build("cpu", root / "cpu", onnx_dir)
    _build("gpu", root / "gpu", onnx_dir)
    return _configs(root / "cpu"), _configs(root / "gpu")


def test_gpu_target_uses_tensorrt_dali_and_gpu_instances(target_repositories) -> None:
    from tritonclient.grpc import model_config_pb2

    cpu, gpu = target_repositories
    m = config.MODELS
    assert set(gpu) == set(cpu) == {m.preprocess, m.detector, m.classifier, m.pipeline, m.diagnosis}
    for name in (m.detector, m.classifier, m.diagnosis):
        assert gpu[name].platform == "tensorrt_plan", name
    assert gpu[m.preprocess].backend == "dali"
    assert gpu[m.pipeline].platform == "ensemble"
    for name, cfg in gpu.items():
        assert cfg.name == name
        if name == m.pipeline:
            continue  # ensembles cannot have instance groups: their members scale
        assert cfg.instance_group, f"{name}: no instance_group"
        for group in cfg.instance_group:
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU, name


def _signature(cfg, field: str) -> list[tuple]:
    return sorted((t.name, t.data_type, tuple(t.dims)) for t in getattr(cfg, field))


def test_gpu_target_keeps_the_cpu_targets_tensor_contract(target_repositories) -> None:
    cpu, gpu = target_repositories
    for name in cpu:
        for field in ("input", "output"):
            assert _signature(gpu[name], field) == _signature(cpu[name], field), (
                f"{name}.{field} differs between targets"
            )
    steps = [
        (s.model_name, dict(s.input_map), dict(s.output_map))
        for s in gpu[config.MODELS.pipeline].ensemble_scheduling.step
    ]
    assert steps == [
        (s.model_name, dict(s.input_map), dict(s.output_map))
        for s in cpu[config.MODELS.pipeline].ensemble_scheduling.step
    ]


# ------------------------------------- the Job's script, end to end with a fake GPU toolchain
FAKE_MARROWDX = """#!/usr/bin/env bash
# export --tensorrt: fake engines + sidecars (no TensorRT here); build: the real command
set -euo pipefail
if [[ "$1" == export ]]; then
    exec "{python}" - "$@" <<'PY'
import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
precision = "fp16" if "--fp16" in args else "fp32"
out.mkdir(parents=True)
for kind in ("detector", "classifier", "diagnosis"):
    (out / f"{{kind}}.{{precision}}.plan").write_bytes(kind.encode())
    side = {{"gpu_name": "{gpu}", "tensorrt_version": "{trt}", "model": kind}}
    (out / f"{{kind}}.{{precision}}.plan.json").write_text(json.dumps(side))
PY
fi
exec "{python}" -m marrowdx "$@" --onnx-dir "{onnx}" --work-dir "{work}"
"""


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx", reason="synthetic ONNX graphs need the onnx package")
    from tests.helpers import onnx_graphs

    folder = tmp_path_factory.mktemp("onnx")
    onnx_graphs.write_all(folder)
    return folder


def test_build_engines_script_publishes_a_checked_release(
    onnx_dir: Path, tmp_path: Path, manifest
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = FAKE_MARROWDX.format(
        python=sys.executable, onnx=onnx_dir, work=tmp_path / "work", gpu=H100, trt="10.5.0"
    )
    (bin_dir / "marrowdx").write_text(fake)
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{H100}'\n")
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    env = {
        **os.environ,
        # python3 = the venv's, nvidia-smi/marrowdx = the fakes; TRT_VERSION as NGC images set it
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TRT_VERSION": "10.5.0.18",
    }
    script = DEPLOY / "scripts" / "build_engines.sh"
    models = tmp_path / "models"

    def run(release: str) -> subprocess.CompletedProcess:
        cmd = [str(script), str(models), release]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    proc = run("r1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    release = models / "releases" / "r1"
    for model in ("detector", "classifier", "diagnosis"):
        assert (release / model / "1" / "model.plan").read_bytes() == model.encode()
    assert (release / "preprocess" / "1" / "dali.py").exists()
    assert manifest.verify(release, H100, "10.5.0.18") == []
    assert manifest.verify(release, L4, "10.5.0.18")  # what the init container would refuse
    assert not any((models / "staging").iterdir()), "staging left behind"
    # a published release is never overwritten
    again = run("r1")
    assert again.returncode == 1 and "already published" in again.stderr
    # engines whose sidecars name another GPU are refused before anything is published
    (bin_dir / "marrowdx").write_text(fake.replace(H100, L4))
    refused = run("r2")
    assert refused.returncode == 1 and "REFUSED" in refused.stderr, refused.stderr
    assert not (models / "releases" / "r2").exists()


def test_manifest_runs_without_marrowdx_beside_its_engine_fit_copy(tmp_path: Path) -> None:
    """The serving image runs the script with the NGC python3, where marrowdx is not
    installed; the Dockerfile puts src/marrowdx/engine_fit.py beside it. ``-S`` hides every
    site-packages folder, as that interpreter has none of ours."""
    here = tmp_path / "opt"
    here.mkdir()
    shutil.copy(DEPLOY / "scripts" / "engine_manifest.py", here)
    cpu = tmp_path / "cpu"
    (cpu / "detector" / "1").mkdir(parents=True)
    cmd = [sys.executable, "-S", str(here / "engine_manifest.py"), "verify", str(cpu)]
    alone = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert alone.returncode != 0 and "engine_fit" in alone.stderr  # the copy is needed
    shutil.copy(DEPLOY.parent / "src" / "marrowdx" / "engine_fit.py", here)
    paired = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert paired.returncode == 0, paired.stderr


def test_engine_profiles_match_the_gpu_repository_configs(target_repositories) -> None:
    """What `marrowdx build --target gpu` writes is what the engines' profiles are cut to,
    and build_engines.sh leaves the profile to that config (no --max-batch of its own)."""
    from marrowdx.export import tensorrt_build

    _, gpu = target_repositories
    plans = [name for name, cfg in gpu.items() if cfg.platform == "tensorrt_plan"]
    assert len(plans) == 3
    for name in plans:
        assert tensorrt_build.batch_profile(name).max == gpu[name].max_batch_size, name
    assert "--max-batch" not in (DEPLOY / "scripts" / "build_engines.sh").read_text()
