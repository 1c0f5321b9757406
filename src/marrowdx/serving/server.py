"""Launch and supervise the real ``tritonserver`` binary (the one inside ``nvidia-pytriton``).

:func:`launch_triton` is the one way this project starts Triton: ``marrowdx serve``, the
demo, the benchmarks, the load test and the tests all use it, so they share the install
folder, the command line, the port policy (:class:`PortPolicy`), the readiness wait, the log
and the shutdown, and the tests exercise exactly what users run.

Hardening defaults (why): the embedded server runs next to lab data, so by default it
listens on 127.0.0.1 only, and the administrative endpoints (model load/unload, shared
memory registration, statistics, trace and log settings) need an admin key sent as a
request header; inference, health and metadata stay open so clients need no secret.
``--model-control-mode=none`` (the default) means models cannot be loaded or unloaded at all.

Model processes are watched (:meth:`TritonServer.dead_models`): Triton 2.51 does not notice
a python-backend model process that died and keeps claiming ready, so the launcher does.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from marrowdx import config
from marrowdx.errors import InputError, ServerError
from marrowdx.serving.triton_install import TritonInstall, ensure_installed

#: Name of the key in Triton's --grpc-restricted-protocol flag.
ADMIN_KEY_NAME = "marrowdx-admin-key"
#: The request header that carries the admin key, the same on HTTP and gRPC: Triton 2.51
#: prefixes gRPC restriction keys with "triton-grpc-protocol-", so the HTTP restriction is
#: given that full name too and clients need to know only one header.
ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_NAME}"
#: Environment variable read when no --admin-key is given.
ADMIN_KEY_ENV = "MARROWDX_ADMIN_KEY"
#: Endpoint groups (Triton's names) that need the admin key; same list as PyTriton's default.
RESTRICTED_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
#: Loopback by default: other interfaces only with an explicit --bind.
DEFAULT_BIND = "127.0.0.1"
#: Model loading (python stubs, DALI, ONNX sessions) takes ~10 s here; allow for slow CI hosts.
DEFAULT_READY_TIMEOUT_S = 180.0
#: How long Triton may take to drain and unload after SIGTERM/SIGINT before it is killed.
STOP_TIMEOUT_S = 60.0
#: Triton's own limit (--exit-timeout-secs) on waiting for in-flight requests and model
#: unloads at shutdown (its default is 30 s). A model whose process died never finishes
#: unloading, so this is what a stop of such a server costs; draining healthy requests
#: takes well under it on the CPU target.
TRITON_EXIT_TIMEOUT_S = 10
#: After a model process died the server's state no longer matters: how long a graceful
#: stop may take before the whole process group is killed.
DEAD_MODEL_STOP_TIMEOUT_S = 5.0
#: Executable name of the python backend's per-instance model process.
STUB_NAME = "triton_python_backend_stub"
#: Where a model process's shared-memory region lives, and the names the python backend gives
#: them (a plain file name: what a stub's argv says is never a path out of /dev/shm).
SHM_DIR = Path("/dev/shm")
SHM_REGION = re.compile(r"triton_python_backend_shm_region_[0-9A-Za-z-]+")
#: Folder under the work dir where the launcher keeps its copy of the Triton tree.
TRITON_INSTALL_DIR = "triton"
#: After a kill the kernel may hold the ports for a moment: how long a restart on the same
#: ports keeps retrying.
RESTART_PORT_WAIT_S = 60.0


@dataclass(frozen=True)
class ServerConfig:
    repository: Path
    http_port: int = config.DEFAULT_PORTS.http
    grpc_port: int = config.DEFAULT_PORTS.grpc
    metrics_port: int = config.DEFAULT_PORTS.metrics
    bind: str = DEFAULT_BIND
    admin_key: str = ""
    model_control_mode: str = "none"  # none | poll | explicit
    log_verbose: int = 0
    log_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    model_config_name: str = ""
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def grpc_url(self) -> str:
        return f"{_host(self.bind)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_host(self.bind)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_host(self.bind)}:{self.metrics_port}/metrics"


def _host(bind: str) -> str:
    """Address a local client should dial for a bind address (0.0.0.0 is not dialable)."""
    if bind in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bind == "::":
        return "[::1]"
    return f"[{bind}]" if ":" in bind else bind


def resolve_admin_key(explicit: str | None) -> tuple[str, bool]:
    """(key, generated): --admin-key, else $MARROWDX_ADMIN_KEY, else a fresh random key."""
    if explicit:
        return explicit, False
    if os.environ.get(ADMIN_KEY_ENV):
        return os.environ[ADMIN_KEY_ENV], False
    return secrets.token_urlsafe(24), True


def free_port(host: str = DEFAULT_BIND) -> int:
    """A port the OS says is free now (for a server started right after)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = DEFAULT_BIND) -> tuple[int, ...]:
    """``count`` distinct free ports: the sockets are held open together, so the OS cannot
    hand out the same port twice (as separate :func:`free_port` calls may)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return tuple(s.getsockname()[1] for s in socks)


def first_free_run(start: int, count: int, end: int, host: str = DEFAULT_BIND) -> int:
    """First ``p >= start`` (in steps of ``count``) with ``p .. p+count-1`` all bindable and
    below ``end``, so a rerun does not trip over sockets of the previous run in TIME_WAIT."""
    for base in range(start, end - count + 1, count):
        if all(port_is_free(base + k, host) for k in range(count)):
            return base
    raise ServerError(f"no {count} free consecutive ports in {start}..{end}")


def port_is_free(port: int, host: str = DEFAULT_BIND) -> bool:
    """Whether a server could listen on ``port`` now. SO_REUSEADDR as Triton sets it: closed
    client connections in TIME_WAIT do not count, a live listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


#: prctl(2) option: signal the child when its parent thread exits (Linux).
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int):
    """A preexec hook: Triton gets SIGTERM if the launching process dies without stopping it
    (killed test run, crashed `marrowdx serve`), so a server is never orphaned. Linux only;
    the launcher must run in the thread that stays alive (the main thread here)."""

    def hook() -> None:
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook if sys.platform.startswith("linux") else None


def triton_arguments(cfg: ServerConfig, install: TritonInstall) -> list[str]:
    """The tritonserver command line for ``cfg`` (no secrets are logged by Triton: the key
    is only compared against request headers)."""
    args = [
        str(install.binary),
        f"--model-repository={Path(cfg.repository).resolve()}",
        f"--backend-directory={install.backend_directory}",
        f"--cache-directory={install.cache_directory}",
        f"--http-port={cfg.http_port}",
        f"--grpc-port={cfg.grpc_port}",
        f"--metrics-port={cfg.metrics_port}",
        f"--http-address={cfg.bind}",
        f"--grpc-address={cfg.bind}",
        f"--metrics-address={cfg.bind}",
        f"--model-control-mode={cfg.model_control_mode}",
        f"--log-verbose={cfg.log_verbose}",
        "--allow-gpu-metrics=false",
        # CPU-only serving: no pinned (page-locked) staging pool for GPU copies.
        "--pinned-memory-pool-byte-size=0",
        "--exit-on-error=true",
        "--strict-readiness=true",
        f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}",
        # The python backend's shared memory starts small and grows: /dev/shm may be small.
        "--backend-config=python,shm-default-byte-size=16777216",
        "--backend-config=python,shm-growth-byte-size=16777216",
    ]
    if cfg.model_control_mode == "explicit":
        args.append("--load-model=*")
    if cfg.admin_key:
        apis = ",".join(RESTRICTED_APIS)
        args += [
            f"--grpc-restricted-protocol={apis}:{ADMIN_KEY_NAME}={cfg.admin_key}",
            f"--http-restricted-api={apis}:{ADMIN_KEY_HEADER}={cfg.admin_key}",
        ]
    if cfg.tls_cert or cfg.tls_key:
        if not (cfg.tls_cert and cfg.tls_key):
            raise InputError("TLS needs both --tls-cert and --tls-key")
        args += [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={Path(cfg.tls_cert).resolve()}",
            f"--grpc-server-key={Path(cfg.tls_key).resolve()}",
        ]
    if cfg.log_file:
        args.append(f"--log-file={Path(cfg.log_file).resolve()}")
    if cfg.model_config_name:
        args.append(f"--model-config-name={cfg.model_config_name}")
    args += list(cfg.extra_args)
    return args


def redact(args: list[str], secret: str) -> list[str]:
    """The command line with the admin key replaced, for printing or logging."""
    return [a.replace(secret, "***") for a in args] if secret else list(args)


@dataclass(frozen=True)
class ModelProcess:
    """One python-backend stub: the process that runs one instance of one model.

    Why watched: Triton 2.51 does not notice a stub that died (killed by the OOM killer, a
    crash in native code): it keeps reporting the model ready and answers every request
    with "Stub process '<instance>' is not healthy". Only the launcher can tell."""

    pid: int
    model: str  # model name (the folder above the version folder in the stub's argv)
    instance: str  # Triton's instance name, e.g. "preprocess_0_0"
    create_time: float  # with the pid, identifies the process (pids are reused)
    shm_region: str | None = None  # its shared-memory region's name under /dev/shm

    @classmethod
    def from_process(cls, proc) -> ModelProcess | None:
        """The stub described by a ``psutil.Process``, or None if it is not a stub. Its argv
        (python backend 2.51): binary, <repository>/<model>/<version>/model.py, shm region,
        shm sizes, parent pid, backend dir, IPC handle, instance name, ..."""
        import psutil

        try:
            argv = proc.cmdline()
            created = proc.create_time()
        except psutil.Error:
            return None
        if not argv or Path(argv[0]).name != STUB_NAME or len(argv) < 2:
            return None
        model_file = Path(argv[1])
        model = model_file.parent.parent.name if len(model_file.parts) >= 3 else str(model_file)
        instance = argv[8] if len(argv) > 8 else model
        region = argv[2] if len(argv) > 2 and SHM_REGION.fullmatch(argv[2]) else None
        return cls(
            pid=proc.pid, model=model, instance=instance, create_time=created, shm_region=region
        )

    def alive(self) -> bool:
        """Running (a zombie, killed but not yet reaped by Triton, counts as dead)."""
        import psutil

        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.create_time and (
                proc.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.Error:
            return False


class TritonServer:
    """A running tritonserver process in its own process group (its python-backend stubs are
    its children, so stopping the group leaves no orphan)."""

    def __init__(self, cfg: ServerConfig, install: TritonInstall, *, stdout=None) -> None:
        self.cfg = cfg
        self.install = install
        self._stdout = stdout
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after_s: float | None = None
        #: The model processes seen when the server became ready (see :meth:`dead_models`).
        self.model_processes: list[ModelProcess] = []
        #: The shared-memory regions of every model process seen (:meth:`_release_shm`).
        self.shm_regions: set[str] = set()

    def start(self) -> TritonServer:
        for port in (self.cfg.http_port, self.cfg.grpc_port, self.cfg.metrics_port):
            if not port_is_free(
                port, self.cfg.bind if self.cfg.bind not in ("", "::") else "0.0.0.0"
            ):
                raise ServerError(f"port {port} on {self.cfg.bind} is already in use")
        if not Path(self.cfg.repository).is_dir():
            raise ServerError(
                f"model repository {self.cfg.repository} does not exist: run `marrowdx build`"
            )
        env = self.install.environment()
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            triton_arguments(self.cfg, self.install),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=subprocess.STDOUT if self._stdout is not None else None,
            start_new_session=True,  # own process group: signals from the terminal go to us only
            preexec_fn=_die_with_parent(os.getpid()),
        )
        return self

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.cfg.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> float:
        """Block until every model is ready; seconds since start. Raises if Triton exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} while loading models")
            if self.is_ready():
                self.ready_after_s = time.monotonic() - self.started_at
                self.model_processes = self.current_model_processes()
                return self.ready_after_s
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s")

    def current_model_processes(self) -> list[ModelProcess]:
        """The live python-backend stubs under Triton now (none once Triton is gone)."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []
        found = (ModelProcess.from_process(c) for c in children)
        live = [m for m in found if m is not None and m.alive()]
        self.shm_regions.update(m.shm_region for m in live if m.shm_region)
        return live

    def dead_models(self) -> list[ModelProcess]:
        """Model processes that died while Triton lives on and still calls their model
        ready: recorded at readiness, gone now, not replaced by Triton (no live stub with
        the same instance name). Empty while Triton itself is stopped: that is
        :meth:`poll`'s business. A model unloaded on purpose (explicit/poll model control)
        is not ready, so its stopped processes are dropped from the watch, and processes
        of models (re)loaded since are added to it. Without model control no model is
        unloaded on purpose, so every process gone is dead, whatever Triton answers about
        its model in that moment. Why: a killed stub once went unseen while Triton went on
        reporting its model ready (the dead-model reliability test, in a fresh clone), and
        an answer other than "ready" at the one poll that saw the process gone (an HTTP
        error, the model briefly unavailable) is the only way this method drops a process
        from the watch without reporting it."""
        if self.process is None or self.process.poll() is not None:
            return []
        current = self.current_model_processes()
        live = {m.instance for m in current}
        gone = [m for m in self.model_processes if not m.alive() and m.instance not in live]
        controlled = self.cfg.model_control_mode != "none"
        dead = [m for m in gone if not controlled or self.model_ready(m.model) is not False]
        # A watched process still running but not among ``current`` is exiting: its argv is
        # unreadable once its memory is released, before it turns zombie. Dropped from the
        # watch then, its death went unseen (the dead-model reliability test, twice in a
        # fresh clone): it stays watched until it is gone.
        seen = {m.pid for m in current}
        exiting = [m for m in self.model_processes if m.pid not in seen and m.alive()]
        self.model_processes = current + exiting + dead
        return dead

    def model_ready(self, model: str) -> bool | None:
        """Triton's readiness of one model: None when Triton does not answer."""
        url = f"{self.cfg.http_url}/v2/models/{model}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError:
            return False
        except (urllib.error.URLError, OSError):
            return None

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM Triton (it unloads models and stops its stubs), wait, then make sure the
        whole process group is gone. Returns Triton's exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.current_model_processes()  # their shm regions, for _release_shm
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        self._release_shm()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL Triton's whole process group (Triton and every model process) and reap it."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def _release_shm(self) -> None:
        """Remove the shared-memory regions of this server's model processes once its whole
        group is gone. Why: a stub unlinks its region only when it exits cleanly; after a
        crash or a SIGKILL (the OOM killer) every region stays in /dev/shm, 16 MiB or more
        each (seen: 5 regions, 80 MiB, left by the crash tests of each test-suite run), until
        a small /dev/shm is full and no python model can load. The names come from the
        stubs' own argv, so no other server's region is touched."""
        if self.group_alive():
            return
        for name in sorted(self.shm_regions):
            with contextlib.suppress(OSError):
                (SHM_DIR / name).unlink(missing_ok=True)
        self.shm_regions.clear()

    def _reap_group(self) -> None:
        """Kill anything left in Triton's process group (e.g. a stub that outlived a crash),
        and wait a moment for it to be gone: its shared memory is released only then."""
        pgid = self.process.pid if self.process is not None else None
        if pgid is None:
            return
        if self._group_gone_within(5.0):
            return
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self._group_gone_within(2.0)

    def _group_gone_within(self, seconds: float) -> bool:
        """Whether Triton's process group is gone within ``seconds`` (polled)."""
        deadline = time.monotonic() + seconds
        while self.group_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def group_alive(self) -> bool:
        """Whether any process of Triton's group still exists (for orphan checks)."""
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def __enter__(self) -> TritonServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------- launcher
#: How far above its start a port search (:meth:`PortPolicy.search_from`) may go.
PORT_SEARCH_SPAN = 100


@dataclass(frozen=True)
class PortPolicy:
    """Which ports (HTTP, gRPC, metrics) a launched Triton listens on; decided here for
    every caller. ``marrowdx serve`` listens on fixed ports (8000/8001/8002 unless told) and
    fails if one is busy, because clients are configured with them; tests, the demo and the
    benchmarks take free ones, because they run next to each other and next to a user's
    server. Build one with the class methods."""

    fixed: config.Ports | None = None  # exactly these (unless busy and fall_back_to_free)
    fall_back_to_free: bool = False  # fixed ports busy: free ones instead of failing
    search_start: int | None = None  # first free consecutive triple at or above this

    @classmethod
    def fixed_ports(cls, ports: config.Ports = config.DEFAULT_PORTS) -> PortPolicy:
        """``marrowdx serve``: these ports or an error naming the busy one."""
        return cls(fixed=ports)

    @classmethod
    def free(cls) -> PortPolicy:
        """Tests: any three free ports."""
        return cls()

    @classmethod
    def defaults_if_free(cls) -> PortPolicy:
        """The demo: the default ports when all are free (a user can reach it at the usual
        address), else free ones."""
        return cls(fixed=config.DEFAULT_PORTS, fall_back_to_free=True)

    @classmethod
    def search_from(cls, start: int) -> PortPolicy:
        """Benchmarks (``--port``): the first free consecutive HTTP/gRPC/metrics triple at or
        above ``start``, so their servers sit in a known range a firewall may open."""
        return cls(search_start=start)

    def resolve(self, host: str = DEFAULT_BIND) -> config.Ports:
        """The ports to start on now (free ones are free at this moment only)."""
        if self.fixed is not None:
            ports = (self.fixed.http, self.fixed.grpc, self.fixed.metrics)
            if not self.fall_back_to_free or all(port_is_free(p, host) for p in ports):
                return self.fixed
        if self.search_start is not None:
            base = first_free_run(self.search_start, 3, self.search_start + PORT_SEARCH_SPAN, host)
            return config.Ports(http=base, grpc=base + 1, metrics=base + 2)
        http, grpc, metrics = free_ports(3, host)
        return config.Ports(http=http, grpc=grpc, metrics=metrics)


def _dialable_bind(bind: str) -> str:
    """The address to probe a port on for a bind address (wildcards probe every interface)."""
    return "0.0.0.0" if bind in ("", "::") else bind


@dataclass
class LaunchedTriton:
    """A Triton started by :func:`launch_triton`: where it listens, its pid and its log.
    ``server`` is the process handle (signals, model-process watch); it changes on
    :meth:`restart`."""

    server: TritonServer
    log_path: Path | None
    _log: IO[bytes] | int | None = None  # where Triton's stdout+stderr go (kept for restarts)

    @property
    def cfg(self) -> ServerConfig:
        return self.server.cfg

    @property
    def repository(self) -> Path:
        return Path(self.cfg.repository)

    @property
    def ports(self) -> config.Ports:
        return config.Ports(self.cfg.http_port, self.cfg.grpc_port, self.cfg.metrics_port)

    @property
    def grpc_url(self) -> str:
        return self.cfg.grpc_url

    @property
    def http_url(self) -> str:
        return self.cfg.http_url

    @property
    def metrics_url(self) -> str:
        return self.cfg.metrics_url

    @property
    def admin_key(self) -> str:
        return self.cfg.admin_key

    @property
    def pid(self) -> int:
        return self.server.pid or 0

    def log_text(self) -> str:
        """Triton's output so far ("" when it was not written to a file)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def restart(self, ready_timeout: float = DEFAULT_READY_TIMEOUT_S, *, wait: bool = True) -> None:
        """Stop this Triton (SIGTERM, or reap a killed one) and start a new one with the same
        configuration, ports included (retrying while the kernel still holds them); by
        default returns when it is ready, so a restart that fails fails here."""
        self.server.stop()
        deadline = time.monotonic() + RESTART_PORT_WAIT_S
        while True:
            new = TritonServer(self.cfg, self.server.install, stdout=self._log)
            try:
                new.start()
                break
            except ServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.server = new
        if wait:
            new.wait_ready(ready_timeout)


@contextlib.contextmanager
def launch_triton(
    repository: Path,
    *,
    ports: PortPolicy | None = None,
    work_dir: Path | None = None,
    log_path: Path | None = None,
    inherit_output: bool = False,
    wait: bool = True,
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
    **options,
) -> Iterator[LaunchedTriton]:
    """Start Triton on ``repository`` and stop it (and every model process) on exit.

    ``ports`` defaults to free ports (:meth:`PortPolicy.free`); ``work_dir`` holds the
    unpacked server (default ``build/``); Triton's stdout and stderr go to ``log_path``
    (truncated), to this process's own when ``inherit_output`` (``marrowdx serve``), else
    nowhere. ``wait``: return only once every model is ready (``ServerError`` if Triton
    exits or times out). ``options`` are further :class:`ServerConfig` fields (``bind``,
    ``admin_key``, ``log_verbose``, ``model_control_mode``, ``tls_cert``, ...)."""
    if log_path is not None and inherit_output:
        raise ValueError("launch_triton: log_path and inherit_output exclude each other")
    bind = options.get("bind", DEFAULT_BIND)
    chosen = (ports or PortPolicy.free()).resolve(_dialable_bind(bind))
    cfg = ServerConfig(
        repository=Path(repository),
        http_port=chosen.http,
        grpc_port=chosen.grpc,
        metrics_port=chosen.metrics,
        **options,
    )
    install = ensure_installed(Path(work_dir or config.default_work_dir()) / TRITON_INSTALL_DIR)
    with contextlib.ExitStack() as stack:
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            out: IO[bytes] | int | None = stack.enter_context(open(log_path, "wb"))
        else:
            out = None if inherit_output else subprocess.DEVNULL
        launched = LaunchedTriton(TritonServer(cfg, install, stdout=out), log_path, out)
        try:
            launched.server.start()
            if wait:
                launched.server.wait_ready(ready_timeout)
            yield launched
        finally:
            launched.server.stop()  # the current one: a caller may have restarted it
