"""``python -m marrowdx.bench.loadtest``: locust, headless, against the served stack.

Without ``--host`` it starts its own Triton server on the model repository (and stops it);
with ``--host HOST:PORT`` it targets a running one. Locust runs as a child process (it
monkey-patches the interpreter with gevent, which must not leak into this one) and writes
an HTML report plus its JSON stats, from which the failures are counted.

``--soak --minutes M`` keeps the load on for M minutes while sampling the resident memory
of ``tritonserver`` and all its child processes (the python-backend stubs, where a leak
would live) and fails unless there were 0 failures and memory grew < 10 % after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from marrowdx import config, resources
from marrowdx.bench import workload

#: The packaged locustfile (the checkout's loadtests/ in an editable install).
LOCUSTFILE = resources.locustfile()
#: Ports for a server this command starts itself (the bench's own range).
SERVER_BASE_PORT = 18230
DEFAULT_USERS = 4
DEFAULT_SPAWN_RATE = 2.0
DEFAULT_RUN_TIME = "60s"
DEFAULT_SOAK_MINUTES = 10.0
#: The first part of a soak is warm-up (models load lazily, arenas and caches fill up);
#: memory growth is judged only after it.
SOAK_WARMUP_FRACTION = 0.2
SOAK_SAMPLE_INTERVAL_S = 5.0
#: Samples averaged at each end of the post-warm-up window, to smooth allocator noise.
SOAK_EDGE_SAMPLES = 3
SOAK_MAX_GROWTH = 0.10
#: Extra seconds locust may take beyond its run time (spawning, stopping users, report).
LOCUST_GRACE_S = 120.0


@dataclass
class LocustOutcome:
    requests: int
    failures: int
    by_name: dict[str, dict[str, float]]
    exit_code: int
    html: Path | None


@dataclass
class SoakOutcome:
    minutes: float
    samples_mb: list[tuple[float, float]]  # (seconds since start, RSS MB of server + children)
    warmup_s: float
    baseline_mb: float
    final_mb: float
    growth: float
    max_growth: float = SOAK_MAX_GROWTH
    passed: bool = False
    failures: int = 0
    requests: int = 0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- locust
def locust_command(
    host: str,
    *,
    users: int,
    spawn_rate: float,
    run_time: str,
    html: Path | None,
    json_file: Path,
    extra: list[str] | None = None,
) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    cmd += ["--host", host, "-u", str(users), "-r", str(spawn_rate), "-t", run_time]
    cmd += ["--only-summary", "--json-file", str(json_file.with_suffix(""))]
    # In-flight requests may finish when the time is up, so a slow patient is not a failure.
    cmd += ["--stop-timeout", "60"]
    if html is not None:
        cmd += ["--html", str(html)]
    return cmd + (extra or [])


def run_locust(
    cmd: list[str], json_file: Path, timeout_s: float, html: Path | None
) -> LocustOutcome:
    proc = subprocess.run(cmd, timeout=timeout_s, check=False)
    entries = json.loads(json_file.read_text()) if json_file.exists() else []
    by_name = {
        f"{e.get('method') or ''} {e['name']}".strip(): {
            "requests": e.get("num_requests", 0),
            "failures": e.get("num_failures", 0),
        }
        for e in entries
    }
    return LocustOutcome(
        requests=sum(int(e.get("num_requests", 0)) for e in entries),
        failures=sum(int(e.get("num_failures", 0)) for e in entries),
        by_name=by_name,
        exit_code=proc.returncode,
        html=html,
    )


def parse_run_time(text: str) -> float:
    """Seconds from locust's run-time syntax (``90``, ``30s``, ``5m``, ``1h30m``)."""
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    for ch in text.strip():
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total += float(number) * units[ch]
            number = ""
        else:
            raise ValueError(f"bad run time {text!r}")
    return total + (float(number) if number else 0.0)


# ------------------------------------------------------------------------------ server
@contextlib.contextmanager
def own_server(repository: Path) -> Iterator[tuple[str, int]]:
    """A Triton server on this command's ports; yields (gRPC target, server pid)."""
    import secrets

    from marrowdx.serving.server import PortPolicy, launch_triton

    ports = PortPolicy.search_from(SERVER_BASE_PORT)
    # A random admin key nobody knows: the admin endpoints stay closed during the test.
    with launch_triton(repository, ports=ports, admin_key=secrets.token_urlsafe(16)) as server:
        yield server.grpc_url, server.pid


def pid_listening_on(port: int) -> int | None:
    """The process serving ``port`` locally, for a soak against a server started elsewhere."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if (
            conn.status == psutil.CONN_LISTEN
            and conn.laddr
            and conn.laddr.port == port
            and conn.pid
        ):
            return conn.pid
    return None


# -------------------------------------------------------------------------------- soak
def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (MB)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total / 1e6


def judge_soak(samples: list[tuple[float, float]], warmup_s: float, minutes: float) -> SoakOutcome:
    """Growth from just after warm-up to the end, each end averaged over a few samples."""
    after = [mb for t, mb in samples if t >= warmup_s]
    outcome = SoakOutcome(minutes, samples, warmup_s, float("nan"), float("nan"), float("nan"))
    if len(after) < 2 * SOAK_EDGE_SAMPLES:
        outcome.notes.append(
            f"only {len(after)} samples after warm-up; need {2 * SOAK_EDGE_SAMPLES} (soak longer)"
        )
        return outcome
    outcome.baseline_mb = statistics.fmean(after[:SOAK_EDGE_SAMPLES])
    outcome.final_mb = statistics.fmean(after[-SOAK_EDGE_SAMPLES:])
    outcome.growth = outcome.final_mb / outcome.baseline_mb - 1.0
    outcome.passed = outcome.growth < SOAK_MAX_GROWTH
    return outcome


class MemorySampler(threading.Thread):
    """Samples the server tree's RSS every few seconds until stopped."""

    def __init__(self, pid: int, interval_s: float = SOAK_SAMPLE_INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - start, tree_rss_mb(self.pid)))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> list[tuple[float, float]]:
        self._stop_event.set()
        self.join()
        return self.samples


# --------------------------------------------------------------------------------- cli
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m marrowdx.bench.loadtest", description=__doc__.splitlines()[0]
    )
    p.add_argument("--host", help="gRPC HOST:PORT of a running server (default: start one)")
    p.add_argument(
        "--repository", type=Path, default=None, help="model repository for an own server"
    )
    p.add_argument("--users", type=int, default=DEFAULT_USERS)
    p.add_argument("--spawn-rate", type=float, default=DEFAULT_SPAWN_RATE)
    p.add_argument(
        "--run-time", default=DEFAULT_RUN_TIME, help="locust syntax: 30s, 5m (ignored with --soak)"
    )
    p.add_argument("--html", type=Path, default=config.default_work_dir() / "locust_report.html")
    p.add_argument(
        "--json", type=Path, default=None, help="write the outcome (and soak samples) here"
    )
    p.add_argument(
        "--images-dir", type=Path, default=None, help="JPEG/PNG fields (default: simulated)"
    )
    p.add_argument("--workload-images", type=int, default=workload.DEFAULT_LOADTEST_IMAGES)
    p.add_argument("--fields-per-patient", type=int, default=workload.STANDARD_PATIENT_FIELDS)
    p.add_argument(
        "--soak", action="store_true", help="long run: 0 failures and flat server memory"
    )
    p.add_argument("--minutes", type=float, default=DEFAULT_SOAK_MINUTES, help="soak duration")
    p.add_argument(
        "--sample-interval",
        type=float,
        default=SOAK_SAMPLE_INTERVAL_S,
        help="soak: seconds between RSS samples",
    )
    p.add_argument(
        "--server-pid", type=int, default=None, help="soak with --host: the server's pid"
    )
    return p


def run(args: argparse.Namespace) -> int:
    # Simulate the images once here, not in every locust process (and not in its timeout).
    images_dir = args.images_dir or workload.simulated_workload(args.workload_images).source
    run_time = f"{args.minutes * 60:.0f}s" if args.soak else args.run_time
    json_file = (args.json or args.html).with_suffix(".locust.json")
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.unlink(missing_ok=True)
    extra = ["--images-dir", str(images_dir), "--fields-per-patient", str(args.fields_per_patient)]
    with contextlib.ExitStack() as stack:
        if args.host:
            host, pid = args.host, args.server_pid
            if args.soak and pid is None:
                pid = pid_listening_on(int(host.rsplit(":", 1)[1]))
                if pid is None:
                    print(
                        "soak: cannot find the server process; pass --server-pid", file=sys.stderr
                    )
                    return 2
        else:
            repository = args.repository or config.default_model_repository()
            host, pid = stack.enter_context(own_server(repository))
        sampler = MemorySampler(pid, args.sample_interval) if args.soak else None
        if sampler is not None:
            sampler.start()
        cmd = locust_command(
            host,
            users=args.users,
            spawn_rate=args.spawn_rate,
            run_time=run_time,
            html=args.html,
            json_file=json_file,
            extra=extra,
        )
        outcome = run_locust(cmd, json_file, parse_run_time(run_time) + LOCUST_GRACE_S, args.html)
        samples = sampler.stop() if sampler is not None else []

    doc: dict = {"host": host, "locust": asdict(outcome) | {"html": str(outcome.html)}}
    ok = outcome.failures == 0 and outcome.requests > 0 and outcome.exit_code == 0
    print(
        f"locust: {outcome.requests} requests, {outcome.failures} failures, "
        f"exit {outcome.exit_code}"
    )
    if args.soak:
        soak = judge_soak(samples, args.minutes * 60 * SOAK_WARMUP_FRACTION, args.minutes)
        soak.failures, soak.requests = outcome.failures, outcome.requests
        doc["soak"] = asdict(soak)
        print(
            f"soak: server RSS {soak.baseline_mb:.0f} MB -> {soak.final_mb:.0f} MB after warm-up "
            f"(growth {soak.growth:+.1%}, limit {SOAK_MAX_GROWTH:.0%}) {' '.join(soak.notes)}"
        )
        ok = ok and soak.passed
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if args.html:
        print(f"HTML report: {args.html}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
