"""gRPC calls to the Triton ensemble and the diagnosis model, with retries.

Everything that touches the wire lives here: building ``InferInput``/``InferRequestedOutput``,
the opaque request id, per-attempt deadlines, and the retry policy. Requests carry image
bytes (or count fractions) and a random request id only: no patient id, no file name, no
custom headers, so nothing identifying can reach the server or its logs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from marrowdx import config, contract
from marrowdx.contract import PIPELINE_OUTPUTS
from marrowdx.differential import DiagnosisInputs
from marrowdx.errors import RequestFailed

T = TypeVar("T")

DEFAULT_REQUEST_TIMEOUT_S = config.CLIENT_REQUEST_TIMEOUT_S
DEFAULT_RETRY_TOTAL_S = config.CLIENT_RETRY_TOTAL_S

#: gRPC status codes that mean "try again later": the server is down, restarting, its queue
#: is full, or the attempt ran out of time. Everything else (INVALID_ARGUMENT for a bad image,
#: INTERNAL for a server fault, ...) is the server's final answer and is not retried.
TRANSIENT_STATUSES = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"})
#: While Triton shuts down (SIGTERM) it unloads models and answers NOT_FOUND with this text
#: for a few seconds before it closes the port (seen with Triton 2.51): part of a restart,
#: so transient. A model that does not exist at all ("... is not found") is not retried.
UNLOADING_MESSAGE = "has no available versions"

#: Longest pause between readiness checks while waiting for a server to come up (s).
READY_POLL_MAX_S = 2.0

log = logging.getLogger("marrowdx.client")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by total elapsed time rather than attempts,
    because what matters across a server restart is how long the caller is willing to wait.
    """

    max_total_s: float = DEFAULT_RETRY_TOTAL_S
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5  # each delay is scaled by a uniform factor in [1 - jitter, 1]

    def backoff(self, attempt: int, rand: float) -> float:
        """Delay before retry number ``attempt`` (1-based); ``rand`` is uniform in [0, 1)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return base * (1.0 - self.jitter * rand)


def is_transient(exc: BaseException) -> bool:
    """Whether an error may go away by itself (so the request is worth repeating)."""
    if isinstance(exc, InferenceServerException):
        if exc.status() == "StatusCode.NOT_FOUND":
            return UNLOADING_MESSAGE in (exc.message() or "")
        return exc.status() in TRANSIENT_STATUSES
    return isinstance(exc, ConnectionError | TimeoutError)


def describe(exc: BaseException) -> str:
    """The server's reason, with its gRPC status, as one line."""
    if isinstance(exc, InferenceServerException):
        status = (exc.status() or "").removeprefix("StatusCode.")
        message = exc.message() or "no message"
        return f"{status}: {message}" if status else message
    return f"{type(exc).__name__}: {exc}"


async def call_with_retry(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``attempt`` until it succeeds, fails for good, or the time budget is spent.

    Raises RequestFailed with the last error's text. Each call re-sends one whole request
    whose answer replaces (never adds to) a previous one, so retries cannot double-count.
    """
    start = clock()
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except (InferenceServerException, ConnectionError, TimeoutError) as exc:
            status = exc.status() if isinstance(exc, InferenceServerException) else None
            if not is_transient(exc):
                raise RequestFailed(describe(exc), status=status, attempts=tries) from exc
            delay = policy.backoff(tries, rand())
            elapsed = clock() - start
            if elapsed + delay > policy.max_total_s:
                reason = f"{describe(exc)} (gave up after {tries} attempts in {elapsed:.0f} s)"
                raise RequestFailed(reason, status=status, attempts=tries) from exc
            log.info("retry %d in %.2f s after %s", tries, delay, describe(exc))
            if on_retry is not None:
                on_retry(exc)
            await sleep(delay)


@dataclass(frozen=True)
class TlsOptions:
    """gRPC over TLS: PEM file paths as tritonclient takes them (None = system roots)."""

    root_certificates: str | None = None
    private_key: str | None = None
    certificate_chain: str | None = None


def new_request_id() -> str:
    """Opaque and random: it lets server logs correlate one request, and identifies nobody."""
    return uuid.uuid4().hex


def _infer_input(spec: contract.TensorSpec, value: object) -> grpcclient.InferInput:
    """One request of batch 1, typed as the contract says (the length checked by the server)."""
    array = np.asarray(value, dtype=spec.dtype.numpy).reshape(1, -1)
    tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.dtype.wire)
    tensor.set_data_from_numpy(array)
    return tensor


def image_inputs(data: bytes) -> list[grpcclient.InferInput]:
    (spec,) = contract.PIPELINE.inputs
    return [_infer_input(spec, np.frombuffer(data, dtype=spec.dtype.numpy))]


def diagnosis_infer_inputs(
    fractions: np.ndarray, total_cells: float, lab_values: np.ndarray, lab_mask: np.ndarray
) -> list[grpcclient.InferInput]:
    """The gRPC request of the diagnosis model (the arithmetic that makes the values is
    ``marrowdx.differential.diagnosis_inputs``)."""
    values = DiagnosisInputs(
        fractions, np.asarray([total_cells], np.float32), lab_values, lab_mask
    ).tensors()
    return [_infer_input(spec, values[spec.name]) for spec in contract.DIAGNOSIS.inputs]


def requested(names: Sequence[str]) -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(name) for name in names]


class TritonTransport:
    """One gRPC channel to Triton (asyncio), opened lazily inside the running event loop.

    A gRPC asyncio channel belongs to the loop that created it, so the transport must be
    used from one event loop only (the sync client runs its own loop in a thread).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        ssl: bool = False,
        tls: TlsOptions | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.ssl = ssl or tls is not None
        self.tls = tls or TlsOptions()
        self._client: aioclient.InferenceServerClient | None = None
        #: Attempts repeated after a transient failure (for logs, tests and monitoring).
        self.retries = 0

    def _triton(self) -> aioclient.InferenceServerClient:
        if self._client is None:
            self._client = aioclient.InferenceServerClient(
                self.url,
                ssl=self.ssl,
                root_certificates=self.tls.root_certificates,
                private_key=self.tls.private_key,
                certificate_chain=self.tls.certificate_chain,
            )
        return self._client

    async def _infer(
        self, model: str, inputs: list, outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        async def attempt() -> dict[str, np.ndarray]:
            result = await self._triton().infer(
                model,
                inputs,
                outputs=requested(outputs),
                request_id=new_request_id(),
                client_timeout=self.timeout,
            )
            arrays = {}
            for name in outputs:
                array = result.as_numpy(name)
                if array is None:
                    raise RequestFailed(f"model {model!r} returned no {name} output")
                arrays[name] = array[0]  # drop the batch dimension of our single request
            return arrays

        return await call_with_retry(attempt, self.retry, on_retry=self._count_retry)

    def _count_retry(self, _exc: BaseException) -> None:
        self.retries += 1

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        """Run the per-image ensemble on encoded bytes; returns the outputs without batch dim."""
        return await self._infer(config.MODELS.pipeline, image_inputs(data), PIPELINE_OUTPUTS)

    async def infer_diagnosis(
        self,
        fractions: np.ndarray,
        total_cells: float,
        lab_values: np.ndarray,
        lab_mask: np.ndarray,
    ) -> np.ndarray:
        inputs = diagnosis_infer_inputs(fractions, total_cells, lab_values, lab_mask)
        outputs = await self._infer(
            config.MODELS.diagnosis, inputs, (config.TENSORS.diagnosis_probs,)
        )
        return outputs[config.TENSORS.diagnosis_probs]

    async def wait_until_ready(
        self,
        models: Sequence[str],
        max_wait_s: float,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """Block until the server is live and every model is ready, or raise RequestFailed.

        Unreachable or not-yet-ready counts as transient (the server may be starting);
        ``on_wait`` hears each reason for waiting; the reason for giving up names what was
        missing.
        """
        policy = RetryPolicy(
            max_total_s=max_wait_s,
            initial_backoff_s=self.retry.initial_backoff_s,
            max_backoff_s=min(self.retry.max_backoff_s, READY_POLL_MAX_S),
        )

        async def attempt() -> None:
            client = self._triton()
            if not await client.is_server_live(client_timeout=self.timeout):
                raise InferenceServerException(
                    "server is not live", status="StatusCode.UNAVAILABLE"
                )
            for model in models:
                if not await client.is_model_ready(model, client_timeout=self.timeout):
                    raise InferenceServerException(
                        f"model {model!r} is not ready", status="StatusCode.UNAVAILABLE"
                    )

        notify = None if on_wait is None else (lambda exc: on_wait(describe(exc)))
        await call_with_retry(attempt, policy, on_retry=notify)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
