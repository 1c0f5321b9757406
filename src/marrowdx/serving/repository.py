"""``build_repository``: a complete Triton model repository for the cpu or gpu target.

Layout in git (``model_repository/``, hand-written): per model a ``config.pbtxt`` for the
cpu target (python backend), ``configs/gpu.pbtxt`` for the gpu target (Triton's own
``configs/<name>.pbtxt`` convention, so ``tritonserver --model-config-name=gpu`` would also
pick it), and the version folder ``1/`` with the thin ``model.py`` (cpu) or ``dali.py`` (gpu).
Generated files (``1/model.onnx``; on the GPU node ``1/model.plan``) are git-ignored and
written here.

cpu target: the output is the source folder itself by default (generated files are added
in place), or a copy. gpu target: ``config.pbtxt`` in the output is the gpu variant, so the
gpu repository must be a separate folder (the source's cpu configs stay untouched).

Idempotent: every file is written only when its bytes differ, so a second build with nothing
changed writes nothing (and Triton's poll mode sees no change).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx import config, contract, resources
from marrowdx.errors import RepositoryError
from marrowdx.serving import model_config
from marrowdx.serving.onnx_runner import ONNX_FILENAME

TARGETS = contract.TARGETS
#: The gpu variant of each config, Triton's ``configs/<name>.pbtxt`` layout.
GPU_CONFIG = contract.GPU_CONFIG
#: Models that run an exported ONNX graph (python backend on cpu, TensorRT engine on gpu).
ONNX_MODELS = contract.EXPORTED_MODELS
ALL_MODELS = tuple(contract.MODELS)
#: TensorRT engine name Triton's tensorrt_plan platform loads by default.
PLAN_FILENAME = "model.plan"
#: The DALI backend autoserializes this file on load (needs marrowdx.preprocess importable).
DALI_FILENAME = "dali.py"
#: Core modules the gpu preprocess model carries next to dali.py, so the NGC container needs
#: no marrowdx install: the one pipeline definition plus what it imports.
PIPELINE_SOURCES = ("__init__.py", "config.py", "taxonomy.py", "preprocess.py")
VENDOR_DIR = "marrowdx_src"


@dataclass
class BuildResult:
    out: Path
    target: str
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # what still has to happen elsewhere

    @property
    def changed(self) -> bool:
        return bool(self.written)


def source_repository() -> Path:
    """The hand-written sources, from the installed package (the checkout's
    ``model_repository/`` in an editable install), so a wheel alone can build."""
    return resources.model_repository_sources()


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _put_bytes(data: bytes, dst: Path, result: BuildResult) -> None:
    if dst.exists() and dst.read_bytes() == data:
        result.unchanged.append(dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dst)  # atomic: a polling Triton never sees half a file
    result.written.append(dst)


def _put_file(src: Path, dst: Path, result: BuildResult) -> None:
    if src.resolve() == dst.resolve():
        result.unchanged.append(dst)
        return
    if (
        dst.exists()
        and dst.stat().st_size == src.stat().st_size
        and file_digest(dst) == file_digest(src)
    ):
        result.unchanged.append(dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    result.written.append(dst)


def _check_source(src: Path) -> None:
    missing = [
        str(p)
        for name in ALL_MODELS
        for p in [src / name / "config.pbtxt"]
        + ([src / name / GPU_CONFIG] if name != config.MODELS.pipeline else [])
        if not p.exists()
    ]
    if missing:
        raise RepositoryError(
            f"source model repository {src} is incomplete: missing {', '.join(missing)}"
        )


def check_source(target: str) -> Path:
    """The source repository, checked complete and in agreement with the contract for
    ``target``: called before anything is trained or written."""
    src = source_repository()
    _check_source(src)
    model_config.check_repository(src, (target,))
    return src


def onnx_sources(onnx_dir: Path) -> dict[str, Path]:
    """ONNX file per model in a folder of prebuilt ``<model>.onnx`` files."""
    paths = {name: Path(onnx_dir) / f"{name}.onnx" for name in ONNX_MODELS}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise RepositoryError(f"prebuilt ONNX files missing: {', '.join(missing)}")
    return paths


def build_repository(
    out: Path | None = None,
    target: str = "cpu",
    work_dir: Path | None = None,
    *,
    onnx_dir: Path | None = None,
    onnx_files: Mapping[str, Path] | None = None,
) -> BuildResult:
    """Write a complete repository for ``target`` into ``out``; see the module docstring.

    The ONNX models come as ``onnx_files`` (model name -> file) or as a folder of prebuilt
    ``<model>.onnx`` files (``onnx_dir``); ``marrowdx build`` (``marrowdx.export.cli``) trains
    and exports them first. ``work_dir`` only places the gpu target's default output.
    """
    if target not in TARGETS:
        raise RepositoryError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    src = check_source(target)
    out = Path(out) if out is not None else default_output(target, work_dir)
    if target == "gpu" and out.resolve() == src.resolve():
        raise RepositoryError(
            f"the gpu repository replaces config.pbtxt files; write it outside {src} "
            "(e.g. --out build/model_repository_gpu)"
        )
    if onnx_files:
        onnx = dict(onnx_files)
    elif onnx_dir is not None:
        onnx = onnx_sources(onnx_dir)
    else:
        raise RepositoryError(
            "no ONNX models given (onnx_files or onnx_dir); "
            "`marrowdx build` trains and exports them"
        )
    result = BuildResult(out=out, target=target)
    for name in ALL_MODELS:
        model_src, model_out = src / name, out / name
        cfg = model_src / (
            GPU_CONFIG if target == "gpu" and name != config.MODELS.pipeline else "config.pbtxt"
        )
        _put_file(cfg, model_out / "config.pbtxt", result)
        version_src, version_out = model_src / "1", model_out / "1"
        version_out.mkdir(parents=True, exist_ok=True)
        for f in sorted(version_src.iterdir()) if version_src.is_dir() else []:
            if f.is_file() and _belongs_to(target, f.name):
                _put_file(f, version_out / f.name, result)
        if target == "cpu" and out.resolve() != src.resolve():
            for f in sorted((model_src / "configs").glob("*.pbtxt")):  # keep Triton's variants
                _put_file(f, model_out / "configs" / f.name, result)
        if name in ONNX_MODELS:
            _put_file(onnx[name], version_out / ONNX_FILENAME, result)
            if target == "gpu" and not (version_out / PLAN_FILENAME).exists():
                result.pending.append(
                    f"{name}/1/{PLAN_FILENAME}: build the TensorRT engine from "
                    f"{name}/1/{ONNX_FILENAME} on the serving GPU (`marrowdx export --tensorrt`)"
                )
        if target == "gpu" and name == config.MODELS.preprocess:
            _vendor_pipeline(version_out / VENDOR_DIR / "marrowdx", result)
    return result


def _belongs_to(target: str, filename: str) -> bool:
    """cpu runs model.py (python backend); gpu runs dali.py (DALI backend) or engines.

    Generated artefacts are never copied from the source folder: after an in-place build
    (the default) ``model_repository/*/1/`` holds ONNX files of whatever preset was built
    last, and copying them would clobber the ones this build is asked to install.
    """
    if filename.endswith((".tmp", ".pyc")) or filename.startswith((ONNX_FILENAME, PLAN_FILENAME)):
        return False
    if target == "cpu":
        return filename != DALI_FILENAME
    return filename != "model.py"


def _vendor_pipeline(dst: Path, result: BuildResult) -> None:
    pkg = Path(__file__).resolve().parent.parent  # src/marrowdx
    for name in PIPELINE_SOURCES:
        data = (
            (pkg / name).read_bytes()
            if name != "__init__.py"
            else b'"""marrowdx core, vendored for the DALI backend."""\n'
        )
        _put_bytes(data, dst / name, result)


def default_output(target: str, work_dir: Path | None = None) -> Path:
    """cpu: the source folder (generated files land next to the hand-written ones);
    gpu: ``<work dir>/model_repository_gpu``."""
    if target == "cpu":
        return config.default_model_repository()
    return Path(work_dir or config.default_work_dir()) / "model_repository_gpu"


def missing_artifacts(repo: Path) -> list[str]:
    """Generated files a served repository still lacks (model.onnx for python-backend models,
    model.plan for tensorrt_plan ones), so ``serve`` can say "run marrowdx build" up front
    instead of Triton failing to load a model."""
    missing = []
    for name in ONNX_MODELS:
        cfg = Path(repo) / name / "config.pbtxt"
        if not cfg.exists():
            missing.append(str(cfg))
            continue
        wanted = PLAN_FILENAME if "tensorrt_plan" in cfg.read_text() else ONNX_FILENAME
        if not (Path(repo) / name / "1" / wanted).exists():
            missing.append(f"{name}/1/{wanted}")
    return missing
