"""The peer: what a user would otherwise deploy, the in-process pipeline behind a minimal
per-request gRPC service (one request at a time, batch size 1, no batching).

It runs in its own process so it does not share a GIL with the load generator, exactly as a
real deployment would not. The service uses grpcio's generic handler on raw bytes (no protoc,
no schema): the request is the encoded image, the reply is a small self-describing frame of
the same output tensors the Triton ensemble returns, so both answer with the same data.

Run as ``python -m marrowdx.bench.peer --port P --repository DIR``.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marrowdx import config

SERVICE = "marrowdx.bench.Peer"
INFER_METHOD = f"/{SERVICE}/Infer"
PING_METHOD = f"/{SERVICE}/Ping"
#: The peer handles exactly one request at a time: that is what makes it a "simple" server.
PEER_WORKERS = 1
#: Seconds to wait for the peer process to load its models and answer a ping.
STARTUP_TIMEOUT_S = 180.0
_HEADER = struct.Struct("<I")
_MAX_MESSAGE = config.MAX_IMAGE_BYTES + 1024 * 1024
_GRPC_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
]


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> bytes:
    """``len(header) | JSON header (name, dtype, shape) | raw tensors``: cheap both ways."""
    arrays = {k: np.ascontiguousarray(v) for k, v in outputs.items()}
    header = json.dumps([[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]).encode()
    return b"".join([_HEADER.pack(len(header)), header, *(a.tobytes() for a in arrays.values())])


def decode_outputs(frame: bytes) -> dict[str, np.ndarray]:
    (n,) = _HEADER.unpack_from(frame)
    offset = _HEADER.size + n
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape in json.loads(frame[_HEADER.size : offset]):
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        out[name] = np.frombuffer(frame, dtype=dt, count=count, offset=offset).reshape(shape)
        offset += count * dt.itemsize
    return out


def serve(port: int, repository: Path) -> None:
    """Load the in-process pipeline at batch size 1 and answer one image per request."""
    import grpc

    from marrowdx.bench.limit import open_pipeline

    pipeline = open_pipeline(repository, batch_size=1)

    def infer(request: bytes, context) -> bytes:
        (outputs,) = pipeline.infer([request])
        if not isinstance(outputs, dict):  # Rejected: the peer keeps serving others
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, outputs.reason)
        return encode_outputs(outputs)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Infer": grpc.unary_unary_rpc_method_handler(infer),
            "Ping": grpc.unary_unary_rpc_method_handler(lambda _req, _ctx: b"ok"),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=PEER_WORKERS), options=_GRPC_OPTIONS
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


class PeerClient:
    """Blocking client for the peer (raw bytes in, decoded tensors out); thread-safe."""

    def __init__(self, target: str) -> None:
        import grpc

        self._channel = grpc.insecure_channel(target, options=_GRPC_OPTIONS)
        self._infer = self._channel.unary_unary(INFER_METHOD)
        self._ping = self._channel.unary_unary(PING_METHOD)

    def ping(self, timeout: float = 1.0) -> bool:
        import grpc

        try:
            return self._ping(b"", timeout=timeout) == b"ok"
        except grpc.RpcError:
            return False

    def infer(self, image: bytes) -> dict[str, np.ndarray]:
        return decode_outputs(self._infer(image))

    def cells(self, image: bytes) -> int:
        return int(self.infer(image)[config.TENSORS.num_detections].reshape(-1)[0])

    def close(self) -> None:
        self._channel.close()


@dataclass
class PeerProcess:
    """The peer server as a child process; a context manager that always stops it."""

    port: int
    repository: Path
    process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> PeerProcess:
        cmd = [sys.executable, "-m", "marrowdx.bench.peer", "--port", str(self.port)]
        cmd += ["--repository", str(self.repository)]
        self.process = subprocess.Popen(cmd)
        client = PeerClient(self.target)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not client.ping():
                if self.process.poll() is not None:
                    raise RuntimeError(f"peer server exited with code {self.process.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"peer server not ready after {STARTUP_TIMEOUT_S:.0f} s")
                time.sleep(0.2)
        except BaseException:
            self.__exit__()
            raise
        finally:
            client.close()
        return self

    def __exit__(self, *_exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--repository", type=Path, default=config.default_model_repository())
    args = parser.parse_args(argv)
    serve(args.port, args.repository)
    return 0


if __name__ == "__main__":
    sys.exit(main())
