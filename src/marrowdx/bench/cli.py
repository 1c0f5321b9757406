"""``marrowdx bench``: the limit, the peer and the served stack, side by side in one run.

All three see the same simulated images in the same session, so the ratios compare
plumbing, not inputs or machine load at different times. Heavy imports (DALI, ONNX
Runtime, tritonclient, matplotlib) happen inside :func:`run_bench`.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from marrowdx.bench.harness import (
    bench_repository,
    bench_server,
    busy_note,
    environment,
    stderr_log,
)

#: Images per measured level: small enough that the whole bench takes a few minutes on
#: 2 cores, large enough that every concurrency level sends several full batches.
DEFAULT_IMAGES = 64
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
DEFAULT_PEER_CONCURRENCY = (1, 2)
DEFAULT_BATCH_SIZES = (1, 4, 8)
#: Interleaved repeats for the ratios: background load on a shared host drifts over minutes.
DEFAULT_ROUNDS = 3
#: Ports for the bench's own servers (Triton at +0..+2, the peer at +10).
BENCH_BASE_PORT = 18200
PEER_PORT_OFFSET = 10


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument(
        "--plot", type=Path, default=None, help="PNG plot (default: JSON path with .png)"
    )
    parser.add_argument(
        "--images", type=int, default=DEFAULT_IMAGES, help="images per measured level"
    )
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        default=DEFAULT_CONCURRENCY,
        help="served levels, e.g. 1,2,4,8",
    )
    parser.add_argument(
        "--peer-concurrency", type=_int_list, default=DEFAULT_PEER_CONCURRENCY, help="peer levels"
    )
    parser.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=DEFAULT_BATCH_SIZES,
        help="in-process batch sizes tried",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help="interleaved repeats of the best limit/peer/served setups (0: ratios from sweeps); "
        "the gate workload's on/off rounds",
    )
    parser.add_argument(
        "--repository", type=Path, default=None, help="model repository (default: built one)"
    )
    parser.add_argument(
        "--url", default=None, help="gRPC HOST:PORT of a running server on the same repository"
    )
    parser.add_argument(
        "--admin-key",
        default=os.environ.get("MARROWDX_ADMIN_KEY", ""),
        help="with --url: the server's admin key, for its statistics API (env MARROWDX_ADMIN_KEY)",
    )
    parser.add_argument(
        "--port", type=int, default=BENCH_BASE_PORT, help="first port for the bench's servers"
    )
    from marrowdx.bench import gate, slides

    parser.add_argument(
        "--workload",
        choices=("all", "fields", "slides", "gate"),
        default="all",
        help="fields: limit/peer/served on JPEG fields; slides: the same fields from a DICOM "
        "slide vs as JPEG files (marrowdx.bench.slides); all: both (default); gate: served "
        "fields/s with the field-quality measures on vs off (marrowdx.bench.gate; not in all)",
    )
    parser.add_argument(
        "--gate-concurrency",
        type=int,
        default=gate.DEFAULT_GATE_CONCURRENCY,
        help="client concurrency of the gate workload (both sides)",
    )
    parser.add_argument(
        "--slide-rounds",
        type=int,
        default=slides.DEFAULT_SLIDE_ROUNDS,
        help="interleaved files/slide rounds of the slide workload",
    )
    parser.add_argument(
        "--slide-concurrency",
        type=int,
        default=slides.DEFAULT_SLIDE_CONCURRENCY,
        help="client concurrency of the slide workload (both sides)",
    )
    from marrowdx.client.slides import TILINGS

    parser.add_argument(
        "--slide-tiling",
        choices=TILINGS,
        default=TILINGS[0],
        help="what the slide workload sends, both as files and from the slide",
    )
    configure_gpu_bench(parser)


def configure_gpu_bench(parser: argparse.ArgumentParser) -> None:
    """``--gpu``: the in-process GPU limit instead (marrowdx.bench.gpu); no server."""
    from marrowdx.bench import gpu

    group = parser.add_argument_group("GPU bench (--gpu)")
    group.add_argument(
        "--gpu",
        action="store_true",
        help="measure the in-process GPU limit (decode, models, end to end, agreement with "
        "ONNX Runtime on the CPU) instead; exits 0 with the reason on hosts without CUDA",
    )
    group.add_argument("--gpu-images", type=int, default=512, help="simulated fields to run")
    group.add_argument("--gpu-batch", type=int, default=gpu.DEFAULT_GPU_BATCH, help="batch size")
    group.add_argument(
        "--gpu-passes", type=int, default=gpu.DEFAULT_PASSES, help="timed passes per stage"
    )
    group.add_argument("--preset", default="reference", help="training preset of the weights")
    group.add_argument("--work-dir", type=Path, default=None, help="weights folder (build/)")
    # the tests run the same logic on the CPU; not a way to measure anything
    group.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)


def detect_gpu() -> tuple[dict | None, str]:
    """The GPU bench runs only where CUDA models can run; otherwise say why not."""
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    if shutil.which("nvidia-smi") is None and "CUDAExecutionProvider" not in providers:
        return None, "no CUDA GPU on this host (no nvidia-smi, onnxruntime providers: " + ", ".join(
            providers
        ) + ")"
    return (
        None,
        "a GPU may be present; this bench measures the CPU stack: "
        "`marrowdx bench --gpu --json OUT` measures the GPU",
    )


def run_bench(args: argparse.Namespace) -> int:
    import contextlib

    from marrowdx.bench import report
    from marrowdx.bench import slides as slide_bench
    from marrowdx.bench.limit import DataParallelLimit, host_cores, measure_batch, open_pipeline
    from marrowdx.bench.measure import LevelResult, cpu_seconds, run_threads, with_cpu
    from marrowdx.bench.peer import PeerClient, PeerProcess
    from marrowdx.bench.served import measure_served
    from marrowdx.bench.workload import simulated_workload
    from marrowdx.serving import server as srv

    log = stderr_log("bench")
    if args.gpu:
        from marrowdx.bench import gpu

        return gpu.run_from_args(args, log)
    if args.workload == "slides":
        return slide_bench.run_slide_bench(args, log)
    if args.workload == "gate":
        from marrowdx.bench.gate import run_gate_bench

        return run_gate_bench(args, log)
    repository = bench_repository(args)
    load0 = os.getloadavg()[0]
    wl = simulated_workload(args.images)
    images = list(wl.images)
    n = len(images)
    log(f"{n} simulated {wl.size[0]}x{wl.size[1]} images, {wl.encoded_bytes / 1e6:.1f} MB encoded")

    with contextlib.ExitStack() as stack:
        # Everything is up before the first measurement so the rounds can interleave.
        peer_port = args.port + PEER_PORT_OFFSET
        peer_port = srv.first_free_run(peer_port, 1, peer_port + srv.PORT_SEARCH_SPAN)
        peer = stack.enter_context(PeerProcess(peer_port, repository))
        peer_client = PeerClient(peer.target)
        stack.callback(peer_client.close)
        url, admin_key, server_pid = bench_server(stack, args, repository)
        # CPU time counted: this process (client or in-process pipeline) + the server's tree.
        limit_pids, peer_pids = [], [peer.process.pid]
        served_pids = [server_pid] if server_pid else []
        pipelines = {bs: open_pipeline(repository, bs) for bs in args.batch_sizes}
        cores = host_cores()

        # 1. the limit: in-process, no server, every batch size; all cores either as one
        # pipeline's threads or (where there are several cores) as one pipeline per core.
        limit_runs: dict[str, Callable[[], LevelResult]] = {}
        for bs in args.batch_sizes:
            limit_runs[f"1 process x {cores} threads, batch {bs}"] = lambda bs=bs: with_cpu(
                limit_pids, lambda: measure_batch(pipelines[bs], images, bs)
            )
            if cores > 1:
                pool = stack.enter_context(DataParallelLimit(repository, wl.files, bs, cores))
                limit_runs[f"{cores} processes x 1 thread, batch {bs}"] = pool.measure
        limit_by_config = {}
        for name, run in limit_runs.items():
            limit_by_config[name] = run()
            log(f"limit {name}: {limit_by_config[name].images_per_s:.2f} images/s")

        # 2. the peer: batch 1, one request at a time, in its own process
        def peer_cpu() -> float:
            return cpu_seconds(peer_pids)

        peer_levels = []
        for c in args.peer_concurrency:
            peer_levels.append(run_threads(peer_client.cells, images, c, n, cpu=peer_cpu))
            log(f"peer c={c}: {peer_levels[-1].images_per_s:.2f} images/s")
        # 3. the served stack through the client, concurrency swept
        served = measure_served(url, images, args.concurrency, n, admin_key, served_pids)
        for level in served:
            log(f"served c={level.result.concurrency}: {level.result.images_per_s:.2f} images/s")

        # Side by side: the three best configurations again, interleaved, order rotated.
        best_limit = max(limit_by_config, key=lambda k: limit_by_config[k].images_per_s)
        best_peer = report.BenchResult.best(peer_levels).concurrency
        best_served = report.BenchResult.best([s.result for s in served]).concurrency
        measures = {
            "limit": limit_runs[best_limit],
            "peer": lambda: run_threads(peer_client.cells, images, best_peer, n, cpu=peer_cpu),
            "served": lambda: (
                measure_served(url, images, [best_served], n, admin_key, served_pids)[0].result
            ),
        }
        order = list(measures)
        rounds, round_cpu = [], []
        for r in range(args.rounds):
            names = order[r % 3 :] + order[: r % 3]
            done = {name: measures[name]() for name in names}
            rounds.append({name: done[name].images_per_s for name in names})
            round_cpu.append({name: done[name].to_dict()["cpu_ms_per_image"] for name in order})
            log(
                f"round {r + 1}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in rounds[-1].items())
                + " images/s"
            )
        # 4. slides: the same fields read from a DICOM slide vs from JPEG files, same server.
        slides_doc, slides_skipped = None, slide_bench.slides_available()
        if args.workload == "all" and slides_skipped is None:
            slides = slide_bench.measure_slides(
                url,
                slide_bench.slide_workload(tiling=args.slide_tiling),
                concurrency=args.slide_concurrency,
                rounds=args.slide_rounds,
                cpu_pids=tuple(served_pids),
            )
            slides_doc = slides.to_dict()
            log(slide_bench.summary_line(slides))

    gpu, gpu_reason = detect_gpu()
    env = environment() | {"repository": str(repository), "load_average_1m_start": load0}
    notes = [
        f"limit: the fastest of one process with {cores} ONNX Runtime/DALI threads and "
        f"{cores} single-threaded processes, each over every batch size",
        "served: the Triton ensemble through marrowdx.client.AsyncMarrowClient (its decoding "
        "included); peer: the same in-process pipeline behind a one-request-at-a-time gRPC server",
    ]
    busy = busy_note(load0, env)
    if busy:
        notes.append(busy)
    if args.workload == "all" and slides_skipped:
        notes.append(slides_skipped)
    result = report.BenchResult(
        limit=limit_by_config[best_limit],
        limit_by_config=limit_by_config,
        peer=peer_levels,
        served=[s.result for s in served],
        triton_statistics={
            s.result.concurrency: [w.to_dict() for w in s.statistics] for s in served
        },
        workload=wl.describe(),
        environment=env,
        notes=notes,
        gpu=gpu,
        gpu_reason=gpu_reason,
        rounds=[
            {k: r[k] for k in ("limit", "peer", "served")}
            | {f"{k}_cpu_ms_per_image": cpu[k] for k in ("limit", "peer", "served")}
            for r, cpu in zip(rounds, round_cpu, strict=True)
        ],
        slides=slides_doc,
    )
    doc = report.write_json(result, args.json)
    cpu = result.cpu_efficiency()
    plot = report.write_plot(result, args.plot or args.json.with_suffix(".png"))
    print(
        f"served_over_limit={doc['served_over_limit']:.3f} "
        f"(goal >= {report.GOAL_SERVED_OVER_LIMIT}) "
        f"served_over_peer={doc['served_over_peer']:.3f} (goal >= {report.GOAL_SERVED_OVER_PEER}) "
        f"[{doc['ratio_method']}]\n"
        f"CPU per image: limit {cpu['limit_cpu_ms_per_image']:.0f} ms, "
        f"peer {cpu['peer_cpu_ms_per_image']:.0f} ms, "
        f"served {cpu['served_cpu_ms_per_image']:.0f} ms; "
        f"load average {doc['environment']['load_average_1m']:.1f} on "
        f"{doc['environment']['cpu_cores']} cores\nJSON: {args.json}  plot: {plot}"
    )
    if slides_doc is not None:
        print(slide_bench.summary_line(slides))
    return 0
