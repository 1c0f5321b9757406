"""What every bench workload needs around its measurement: the model repository, a server to
measure, a description of the host, a warning when the host was busy, and a progress log.

Why a module of its own: the workloads (``marrowdx.bench.gate``, ``marrowdx.bench.slides``)
and the command line (``marrowdx.bench.cli``) all use these; the command line imports the
workloads, so the workloads must not import the command line.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from marrowdx import config

#: Load average per core above which the JSON warns that other work skewed wall-clock numbers.
BUSY_LOAD_PER_CORE = 1.0


def environment() -> dict:
    """The host and the versions of what is measured, for the bench JSON."""
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    return {
        # Other work on the host skews wall-clock ratios; the load says how much there was.
        "load_average_1m": os.getloadavg()[0],
        "cpu_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime"),
        "nvidia-dali-cuda120": version("nvidia-dali-cuda120"),
        "nvidia-pytriton": version("nvidia-pytriton"),
        "tritonclient": version("tritonclient"),
    }


def bench_repository(args: argparse.Namespace) -> Path:
    """``--repository`` or the default one, which must exist."""
    from marrowdx.errors import RepositoryError

    repository = args.repository or config.default_model_repository()
    if not repository.is_dir():
        raise RepositoryError(f"model repository {repository} not found; run `marrowdx build`")
    return repository


def busy_note(load_start: float, env: dict, steadier: str = "cpu_efficiency") -> str | None:
    """The JSON's warning when other work on the host skewed wall-clock numbers, naming the
    ``steadier`` figure; None on a quiet host."""
    load_end, cores = env["load_average_1m"], env["cpu_cores"]
    if max(load_start, load_end) <= BUSY_LOAD_PER_CORE * cores:
        return None
    return (
        f"host was busy (load average {load_start:.1f} -> {load_end:.1f} on {cores} "
        f"cores): wall-clock numbers are noisy; {steadier} is the steadier comparison"
    )


def bench_server(stack, args: argparse.Namespace, repository: Path) -> tuple[str, str, int | None]:
    """(gRPC url, admin key, server pid) of the server measured: ``--url`` (with
    ``--admin-key``) or one of the bench's own, stopped when ``stack`` closes."""
    import secrets

    from marrowdx.bench.loadtest import pid_listening_on
    from marrowdx.serving import server as srv

    if args.url:
        return args.url, args.admin_key, pid_listening_on(int(args.url.rsplit(":", 1)[1]))
    # A fresh admin key: the bench reads Triton's (admin-only) statistics API.
    server = stack.enter_context(
        srv.launch_triton(
            repository,
            ports=srv.PortPolicy.search_from(args.port),
            admin_key=secrets.token_urlsafe(16),
        )
    )
    return server.grpc_url, server.admin_key, server.pid


def stderr_log(tag: str) -> Callable[[str], None]:
    """A progress log on stderr, each line prefixed ``[tag]``: stdout carries the results."""

    def log(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return log
