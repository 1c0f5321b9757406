"""``make demo`` / ``python -m marrowdx.demo``: from a fresh clone to a diagnosed cohort.

Builds what is missing (``marrowdx build``: train, export, repository), simulates a sample
cohort with a fixed seed, starts the real Triton server, runs ``marrowdx diagnose`` on the
cohort (table, JSON, CSV, overlays), says how many diagnoses match the simulated truth, and
stops the server, also on Ctrl-C, SIGTERM or errors.

Environment: ``MARROWDX_PRESET`` picks the training preset (default ``reference``; tests
use ``tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from marrowdx import config

#: The sample cohort: fixed seed so every machine diagnoses the same images.
DEMO_SEED = 2026
DEMO_PATIENTS = 6
#: Enough fields (about 26 nucleated cells each) for the ICSH count of 500 nucleated cells
#: that ``diagnose`` stops at; fewer would refer every patient for "fewer cells than target".
DEMO_IMAGES_PER_PATIENT = 24
PRESET_ENV = "MARROWDX_PRESET"
DEFAULT_PRESET = "reference"


def _parser() -> argparse.ArgumentParser:
    work = config.default_work_dir()
    p = argparse.ArgumentParser(prog="python -m marrowdx.demo", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=os.environ.get(PRESET_ENV, DEFAULT_PRESET))
    p.add_argument("--patients", type=int, default=DEMO_PATIENTS)
    p.add_argument("--images-per-patient", type=int, default=DEMO_IMAGES_PER_PATIENT)
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    p.add_argument("--size", type=int, default=config.FIELD_SIZE[0], help="square field side (px)")
    p.add_argument(
        "--cohort", type=Path, default=work / "demo_cohort", help="simulated cohort folder"
    )
    p.add_argument("--out", type=Path, default=work / "demo", help="JSON, CSV and overlays go here")
    p.add_argument("--repository", type=Path, default=config.default_model_repository())
    p.add_argument("--work-dir", type=Path, default=work, help="weights, ONNX and server binaries")
    p.add_argument("--no-build", action="store_true", help="use the repository as it is")
    p.add_argument("--free-ports", action="store_true", help="never use the default ports")
    p.add_argument("--no-progress", action="store_true")
    return p


def _stage(message: str) -> None:
    print(f"==> {message}", flush=True)


def ensure_built(preset: str, repository: Path, work_dir: Path) -> None:
    """``marrowdx build`` is idempotent: it trains/exports only what is missing or stale."""
    cmd = [sys.executable, "-m", "marrowdx", "build", "--preset", preset]
    subprocess.run([*cmd, "--out", str(repository), "--work-dir", str(work_dir)], check=True)


def ensure_cohort(args: argparse.Namespace) -> dict:
    """Simulate the sample cohort unless the same one (same seed and sizes) is already there."""
    from marrowdx.simulate import load_ground_truth, simulate_cohort

    # Beside the cohort, not in it: `diagnose` reports every unexpected file in a cohort.
    stamp = args.cohort.with_name(args.cohort.name + ".demo-parameters.json")
    wanted = {
        "seed": args.seed,
        "patients": args.patients,
        "images": args.images_per_patient,
        "size": args.size,
    }
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return load_ground_truth(args.cohort)
    if args.cohort.exists():
        import shutil

        shutil.rmtree(args.cohort)
    gt = simulate_cohort(
        args.cohort,
        args.patients,
        args.seed,
        images_per_patient=args.images_per_patient,
        size=(args.size, args.size),
        progress=not args.no_progress,
    )
    stamp.write_text(json.dumps(wanted))
    return gt


def matches(ground_truth: dict, report_json: Path) -> tuple[int, int]:
    """(diagnoses equal to the simulated truth, patients)."""
    truth = {p["patient_id"]: p["diagnosis"] for p in ground_truth["patients"]}
    reports = json.loads(report_json.read_text())["patients"]
    return sum(truth.get(r["patient_id"]) == r["diagnosis"] for r in reports), len(truth)


def referred(report_json: Path) -> int:
    """Patients the report refers for review (``refer_for_review``)."""
    return sum(p["refer_for_review"] for p in json.loads(report_json.read_text())["patients"])


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the server like Ctrl-C does
    started = time.monotonic()
    try:
        code = _run(args)
    except KeyboardInterrupt:
        print("demo interrupted; the server was stopped", file=sys.stderr)
        return 130
    print(f"demo took {time.monotonic() - started:.0f} s")
    return code


def _run(args: argparse.Namespace) -> int:
    from marrowdx import cli
    from marrowdx.serving.server import PortPolicy, launch_triton

    if not args.no_build:
        _stage(f"building models and repository (preset {args.preset}; skipped when up to date)")
        ensure_built(args.preset, args.repository, args.work_dir)
    n, k = args.patients, args.images_per_patient
    _stage(f"sample cohort: {n} patients x {k} images, seed {args.seed}")
    ground_truth = ensure_cohort(args)

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "server.log"
    report_json = args.out / "diagnosis.json"
    report_json.unlink(missing_ok=True)  # a stale report must not be counted as this run's
    ports = PortPolicy.free() if args.free_ports else PortPolicy.defaults_if_free()
    with launch_triton(
        args.repository, ports=ports, work_dir=args.work_dir, log_path=log_path, wait=False
    ) as launched:
        try:
            url = launched.grpc_url
            _stage(f"starting Triton (pid {launched.pid}) on {url}; log: {log_path}")
            ready = launched.server.wait_ready()
            _stage(f"server ready after {ready:.0f} s; diagnosing")
            diagnose_args = [
                "diagnose", str(args.cohort), "--url", url, "--json", str(report_json),
                "--csv", str(args.out / "diagnosis.csv"), "--overlays", str(args.out / "overlays"),
                "--html", str(args.out / "review"),
            ]  # fmt: skip
            if args.no_progress:
                diagnose_args.append("--no-progress")
            code = cli.main(diagnose_args)
        finally:
            _stage("stopping the server")  # launch_triton stops it on the way out
    if code == 130:
        raise KeyboardInterrupt
    if report_json.exists():
        k, n = matches(ground_truth, report_json)
        print(f"{k}/{n} diagnoses match the simulated truth")
        print(f"{referred(report_json)}/{n} referred for review")
    print(
        f"outputs: {report_json}, {args.out / 'diagnosis.csv'}, {args.out / 'overlays'}/, "
        f"review page {args.out / 'review' / 'index.html'}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
