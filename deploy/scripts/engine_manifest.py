#!/usr/bin/env python3
"""Record, and check at pod start, which GPU and TensorRT version built a repository's engines.

A TensorRT engine (``model.plan``) only runs on the GPU model and the TensorRT version that
built it; a mismatch shows up as a cryptic deserialisation error, or worse, in the middle of
a rollout. So the engine-build Job writes ``BUILD_INFO.json`` at the repository root
(``record``), and the serving pod's init container refuses to start Triton on a repository
built elsewhere (``verify``), naming what differs.

Runs inside the NGC container (Python 3.10) and the build image: standard library only.
Whether an engine fits this host is decided by ``marrowdx.engine_fit`` (one rule, shared with
``marrowdx export --tensorrt``): imported from the installed package where there is one (the
engine-build image), else from the copy the serving image places next to this script.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    from marrowdx.engine_fit import EngineHost, fit_problems
except ImportError:  # the serving image's python3 (3.10) has no marrowdx: use the copy here
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine_fit import EngineHost, fit_problems  # type: ignore[no-redef]

#: Written at the repository root by ``record``.
BUILD_INFO = "BUILD_INFO.json"
#: Suffix of TensorRT engines in a Triton model repository.
ENGINE_SUFFIX = ".plan"
#: Keys an engine's sidecar JSON (written by ``marrowdx export --tensorrt``) is compared on.
SIDECAR_GPU_KEY = "gpu_name"
SIDECAR_TRT_KEY = "tensorrt_version"
SIDECAR_CAPABILITY_KEY = "compute_capability"
#: How the running side is named in refusals.
HERE = "this pod"
#: Where the NGC images keep libnvinfer when the tensorrt Python module is absent.
LIBNVINFER_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/libnvinfer.so.*.*.*",
    "/usr/lib/aarch64-linux-gnu/libnvinfer.so.*.*.*",
    "/usr/local/tensorrt/lib/libnvinfer.so.*.*.*",
)


class DetectionError(RuntimeError):
    """The GPU or the TensorRT version of this host could not be determined."""


@dataclass(frozen=True)
class BuildInfo:
    gpu_name: str
    tensorrt_version: str
    #: engine path relative to the repository root -> sha256 of its bytes
    engines: dict[str, str] = field(default_factory=dict)
    triton_container: str = ""
    built_at: str = ""

    @classmethod
    def load(cls, path: Path) -> BuildInfo:
        data = json.loads(path.read_text())
        missing = [k for k in ("gpu_name", "tensorrt_version", "engines") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        return cls(
            gpu_name=str(data["gpu_name"]),
            tensorrt_version=str(data["tensorrt_version"]),
            engines={str(k): str(v) for k, v in data["engines"].items()},
            triton_container=str(data.get("triton_container", "")),
            built_at=str(data.get("built_at", "")),
        )


# ------------------------------------------------------------------------------- detection
def detect_gpu_name() -> str:
    """The one GPU model visible to this container (all visible GPUs must be the same)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise DetectionError(f"cannot query the GPU with nvidia-smi: {exc}") from exc
    names = sorted({line.strip() for line in out.splitlines() if line.strip()})
    if len(names) != 1:
        raise DetectionError(f"expected one GPU model in this container, nvidia-smi lists {names}")
    return names[0]


def detect_tensorrt_version() -> str:
    """TensorRT of this container: the Python module, NGC's TRT_VERSION, or libnvinfer's name."""
    try:
        import tensorrt  # type: ignore[import-not-found]

        return str(tensorrt.__version__)
    except ImportError:
        pass
    for var in ("TRT_VERSION", "TENSORRT_VERSION"):
        if os.environ.get(var):
            return os.environ[var]
    for pattern in LIBNVINFER_GLOBS:
        for lib in sorted(glob.glob(pattern)):
            match = re.search(r"libnvinfer\.so\.(\d+(?:\.\d+)+)$", lib)
            if match:
                return match.group(1)
    raise DetectionError("cannot find TensorRT (no tensorrt module, TRT_VERSION or libnvinfer)")


# --------------------------------------------------------------------------------- record
def find_engines(repository: Path) -> list[Path]:
    return sorted(p for p in repository.rglob(f"*{ENGINE_SUFFIX}") if p.is_file())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record(repository: Path, gpu_name: str, tensorrt_version: str) -> BuildInfo:
    """Write BUILD_INFO.json for the engines the Job just built on this GPU."""
    engines = find_engines(repository)
    if not engines:
        raise FileNotFoundError(f"no *{ENGINE_SUFFIX} engines under {repository}")
    info = BuildInfo(
        gpu_name=gpu_name,
        tensorrt_version=tensorrt_version,
        engines={str(p.relative_to(repository)): sha256(p) for p in engines},
        triton_container=os.environ.get("NVIDIA_TRITON_SERVER_VERSION", ""),
        # timezone.utc, not datetime.UTC: the NGC python3 is 3.10
        built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
    )
    (repository / BUILD_INFO).write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
    return info


# --------------------------------------------------------------------------------- verify
def _sidecar_problems(engine: Path, rel: str, gpu_name: str, tensorrt_version: str) -> list[str]:
    """Compare the per-engine sidecar(s) the export step wrote next to the engine."""
    problems = []
    for sidecar in sorted(engine.parent.glob("*.json")):
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{sidecar.name} next to {rel} is unreadable: {exc}")
            continue
        if not isinstance(data, dict):
            continue
        if SIDECAR_GPU_KEY not in data and SIDECAR_TRT_KEY not in data:
            continue  # some other JSON file: not an engine sidecar
        # a key the sidecar lacks is taken as this host's, so only what it records is checked
        built = EngineHost(
            str(data.get(SIDECAR_GPU_KEY, gpu_name)),
            str(data.get(SIDECAR_TRT_KEY, tensorrt_version)),
            str(data.get(SIDECAR_CAPABILITY_KEY, "")),
        )
        running = EngineHost(gpu_name, tensorrt_version)
        problems.extend(f"{rel}: {p}" for p in fit_problems(built, running, HERE))
    return problems


def verify(repository: Path, gpu_name: str | None, tensorrt_version: str | None) -> list[str]:
    """Every reason this host must not serve the repository's engines (empty: all good).

    A repository without engines (the cpu target) needs no GPU and passes; ``gpu_name`` and
    ``tensorrt_version`` are only looked at when there are engines.
    """
    if not repository.is_dir():
        return [f"model repository {repository} does not exist (is the release published?)"]
    engines = find_engines(repository)
    if not engines:
        return []
    if gpu_name is None or tensorrt_version is None:
        return ["the repository holds TensorRT engines but this host has no GPU/TensorRT"]
    info_path = repository / BUILD_INFO
    if not info_path.exists():
        return [f"{info_path} is missing: the engines' GPU and TensorRT version are unknown"]
    try:
        info = BuildInfo.load(info_path)
    except (OSError, ValueError) as exc:
        return [f"{info_path} is unreadable: {exc}"]
    problems = [
        f"engines were {p}"
        for p in fit_problems(
            EngineHost(info.gpu_name, info.tensorrt_version),
            EngineHost(gpu_name, tensorrt_version),
            HERE,
        )
    ]
    for engine in engines:
        rel = str(engine.relative_to(repository))
        if rel not in info.engines:
            problems.append(f"{rel} is not listed in {BUILD_INFO} (copied in after the build?)")
        elif info.engines[rel] != sha256(engine):
            problems.append(f"{rel} differs from the engine recorded in {BUILD_INFO}")
        problems.extend(_sidecar_problems(engine, rel, gpu_name, tensorrt_version))
    for rel in sorted(set(info.engines) - {str(e.relative_to(repository)) for e in engines}):
        problems.append(f"{rel} is listed in {BUILD_INFO} but missing from the repository")
    return problems


# ------------------------------------------------------------------------------------ CLI
def _host(args: argparse.Namespace, need: bool) -> tuple[str | None, str | None]:
    gpu, trt = args.gpu_name, args.tensorrt_version
    try:
        if gpu is None and need:
            gpu = detect_gpu_name()
        if trt is None and need:
            trt = detect_tensorrt_version()
    except DetectionError as exc:
        if args.command == "record":
            raise
        print(f"engine check: {exc}", file=sys.stderr)
    return gpu, trt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("record", "verify"))
    parser.add_argument("repository", type=Path)
    parser.add_argument("--gpu-name", help="skip detection (nvidia-smi)")
    parser.add_argument("--tensorrt-version", help="skip detection (tensorrt / libnvinfer)")
    args = parser.parse_args(argv)
    if args.command == "record":
        gpu, trt = _host(args, need=True)
        info = record(args.repository, gpu, trt)  # type: ignore[arg-type]
        print(f"recorded {len(info.engines)} engines: GPU {gpu!r}, TensorRT {trt}")
        return 0
    has_engines = args.repository.is_dir() and bool(find_engines(args.repository))
    gpu, trt = _host(args, need=has_engines)
    problems = verify(args.repository, gpu, trt)
    for problem in problems:
        print(f"engine check: REFUSED: {problem}", file=sys.stderr)
    if problems:
        print(
            "rebuild the engines on this GPU type (deploy/README.md, 'Build engines')",
            file=sys.stderr,
        )
        return 1
    print(f"engine check: {args.repository} matches this host (GPU {gpu!r}, TensorRT {trt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
