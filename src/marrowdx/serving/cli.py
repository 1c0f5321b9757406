"""``marrowdx serve`` (routed by marrowdx.cli): Triton on a built model repository."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from marrowdx import config

#: How often ``marrowdx serve`` checks that Triton and its model processes are alive.
SUPERVISE_INTERVAL_S = 0.5
#: ``marrowdx serve``'s exit status when a model process died (Triton's own failures pass
#: Triton's code through).
DEAD_MODEL_EXIT_CODE = 3


def configure_serve(parser: argparse.ArgumentParser) -> None:
    from marrowdx.serving import server as srv

    ports = config.DEFAULT_PORTS
    parser.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="model repository (default: model_repository/)",
    )
    parser.add_argument("--http-port", type=int, default=ports.http)
    parser.add_argument("--grpc-port", type=int, default=ports.grpc)
    parser.add_argument("--metrics-port", type=int, default=ports.metrics)
    parser.add_argument(
        "--bind",
        default=srv.DEFAULT_BIND,
        metavar="ADDRESS",
        help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes every interface)",
    )
    parser.add_argument(
        "--admin-key",
        default=None,
        help=f"key for the admin endpoints ({', '.join(srv.RESTRICTED_APIS)}), sent as header "
        f"'{srv.ADMIN_KEY_HEADER}' (HTTP and gRPC); "
        f"default ${srv.ADMIN_KEY_ENV}, else a random one",
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, help="PEM certificate: serve gRPC over TLS"
    )
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert")
    parser.add_argument(
        "--log-verbose", type=int, default=0, help="Triton log verbosity (0 = info only)"
    )
    parser.add_argument(
        "--log-file", type=Path, default=None, help="write Triton's log to this file"
    )
    parser.add_argument(
        "--model-control-mode",
        choices=("none", "poll", "explicit"),
        default="none",
        help="none (default): models are fixed at start; "
        "explicit/poll allow load/unload (admin key required)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the server binaries are unpacked (default: build/)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=srv.DEFAULT_READY_TIMEOUT_S,
        help="seconds to wait for readiness",
    )


def run_serve(args: argparse.Namespace) -> int:
    from marrowdx.errors import RepositoryError
    from marrowdx.serving import server as srv
    from marrowdx.serving.repository import missing_artifacts

    repository = Path(args.repository or config.default_model_repository())
    missing = missing_artifacts(repository)
    if missing:
        raise RepositoryError(
            f"{repository} is not built ({', '.join(missing)} missing): run `marrowdx build`"
        )
    _warn_if_stale(repository, args.work_dir)
    key, generated = srv.resolve_admin_key(args.admin_key)
    ports = config.Ports(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)
    # ServerError / TritonNotInstalled / InputError: marrowdx.cli.main prints them.
    with srv.launch_triton(
        repository,
        ports=srv.PortPolicy.fixed_ports(ports),
        work_dir=args.work_dir,
        inherit_output=True,
        wait=False,  # supervise() waits, so that a Ctrl-C while loading stops cleanly
        bind=args.bind,
        admin_key=key,
        model_control_mode=args.model_control_mode,
        log_verbose=args.log_verbose,
        log_file=args.log_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    ) as launched:
        return supervise(launched.server, ready_timeout=args.ready_timeout, generated_key=generated)


def _warn_if_stale(repository: Path, work_dir: Path | None) -> None:
    """Say so when the repository is older than what ``marrowdx build`` would write (an
    updated checkout's weights, an export not copied in): served as it is, but not
    silently."""
    from marrowdx.export.build import repository_staleness

    reasons = repository_staleness(repository, work_dir)
    if reasons:
        print(
            f"marrowdx serve: warning: {repository} is stale: {'; '.join(reasons)}. "
            "Run `marrowdx build` (`make serve` does) to serve the current models.",
            file=sys.stderr,
        )


def _stop_after_dead_models(server, dead) -> int:
    """Say which model died, stop Triton (killing its group if it does not stop quickly:
    the dead model cannot unload, so a graceful stop would only wait out a timeout)."""
    from marrowdx.serving import server as srv

    for m in dead:
        print(
            f"marrowdx serve: the process of model '{m.model}' (instance {m.instance}, "
            f"pid {m.pid}) died; Triton cannot serve it any more, stopping Triton",
            file=sys.stderr,
            flush=True,
        )
    code = server.stop(srv.DEAD_MODEL_STOP_TIMEOUT_S)
    print(
        f"marrowdx serve: Triton stopped (exit code {code}) after a model process died",
        file=sys.stderr,
        flush=True,
    )
    return DEAD_MODEL_EXIT_CODE


def supervise(server, *, ready_timeout: float, generated_key: bool) -> int:
    """Wait for the started Triton, report the endpoints, forward SIGINT/SIGTERM, return
    only after Triton (and its process group) is gone. Non-zero if Triton died on its own, or
    if one of its model processes died (Triton would keep claiming ready while failing every
    request to that model: better to exit and let the operator's restart policy bring up a
    whole one)."""
    from marrowdx.serving import server as srv

    requested: list[int] = []

    def forward(signum: int, _frame) -> None:
        requested.append(signum)
        server.signal(signal.SIGTERM)  # Triton's graceful shutdown for either signal

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            seconds = server.wait_ready(ready_timeout)
        except srv.ServerError:
            if requested:  # stopped by the user while loading
                server.stop()
                return 0
            raise
        cfg = server.cfg
        scheme = "grpcs" if cfg.tls_cert else "grpc"
        print(f"marrowdx serve: ready in {seconds:.1f} s (Triton pid {server.pid})", flush=True)
        print(f"  gRPC     {scheme}://{cfg.grpc_url}", flush=True)
        print(f"  HTTP     {cfg.http_url}", flush=True)
        print(f"  metrics  {cfg.metrics_url}", flush=True)
        watched = sorted(m.instance for m in server.model_processes)
        # which model processes a death is watched for: what to read first if one goes unseen
        print(f"  watching {len(watched)} model processes: {', '.join(watched)}", flush=True)
        if generated_key:
            if sys.stdout.isatty():
                print(
                    f"  admin key (shown once; send it as header "
                    f"'{srv.ADMIN_KEY_HEADER}'): {cfg.admin_key}",
                    flush=True,
                )
            else:
                print(
                    "  admin endpoints need a key: a random one was generated and is not "
                    "shown because output is not a terminal; "
                    f"set ${srv.ADMIN_KEY_ENV} or --admin-key to choose it",
                    flush=True,
                )
        while server.poll() is None:
            dead = [] if requested else server.dead_models()
            if dead:
                return _stop_after_dead_models(server, dead)
            time.sleep(SUPERVISE_INTERVAL_S)
        code = server.stop()
        if requested:
            print("marrowdx serve: Triton stopped", flush=True)
            return 0 if code == 0 else code
        print(
            f"marrowdx serve: Triton exited unexpectedly with code {code}",
            file=sys.stderr,
            flush=True,
        )
        return code if code and code > 0 else 1
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
