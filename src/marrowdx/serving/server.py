"""Launch and supervise the real ``tritonserver`` binary (the one inside ``nvidia-pytriton``).

Used by ``marrowdx serve`` and by the test fixture, so the fixture exercises the launcher.

Hardening defaults (why): the embedded server runs next to lab data, so by default it
listens on 127.0.0.1 only, and the administrative endpoints (model load/unload, shared
memory registration, statistics, trace and log settings) need an admin key sent as a
request header; inference, health and metadata stay open so clients need no secret.
``--model-control-mode=none`` (the default) means models cannot be loaded or unloaded at all.

Model processes are watched (:meth:`TritonServer.dead_models`): Triton 2.51 does not notice
a python-backend model process that died and keeps claiming ready, so the launcher does.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx import config
from marrowdx.serving.triton_install import TritonInstall

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


class ServerError(RuntimeError):
    """Triton failed to start, or died."""


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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
            raise ValueError("TLS needs both --tls-cert and --tls-key")
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
        return cls(pid=proc.pid, model=model, instance=instance, create_time=created)

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
        return [m for m in found if m is not None and m.alive()]

    def dead_models(self) -> list[ModelProcess]:
        """Model processes that died while Triton lives on and still calls their model
        ready: recorded at readiness, gone now, not replaced by Triton (no live stub with
        the same instance name). Empty while Triton itself is stopped: that is
        :meth:`poll`'s business. A model unloaded on purpose (explicit/poll model control)
        is not ready, so its stopped processes are dropped from the watch, and processes
        of models (re)loaded since are added to it."""
        if self.process is None or self.process.poll() is not None:
            return []
        current = self.current_model_processes()
        live = {m.instance for m in current}
        gone = [m for m in self.model_processes if not m.alive() and m.instance not in live]
        dead = [m for m in gone if self.model_ready(m.model) is not False]
        self.model_processes = current + dead
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
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
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

    def _reap_group(self) -> None:
        """Kill anything left in Triton's process group (e.g. a stub that outlived a crash)."""
        pgid = self.process.pid if self.process is not None else None
        if pgid is None:
            return
        for _ in range(50):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

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
