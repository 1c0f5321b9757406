"""Locust load test of the served stack over Triton's raw gRPC API.

Run headless against a running server::

    locust -f loadtests/locustfile.py --headless --host 127.0.0.1:8001 -u 4 -r 2 -t 60s

or let ``python -m marrowdx.bench.loadtest`` (``make loadtest`` / ``make soak``) start one.

Locust's documented gRPC pattern: a ``User`` whose channel carries an interceptor that fires
``events.request`` for every call. The stub is tritonclient's generated
``GRPCInferenceServiceStub`` (``InferenceServerClient`` takes no interceptor, and
tritonclient's HTTP client pins a geventhttpclient that clashes with locust's).
"""

from __future__ import annotations

import random
import time

# Must run before any channel exists so grpc's core cooperates with gevent's event loop.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from locust.exception import LocustError  # noqa: E402

from marrowdx import config  # noqa: E402
from marrowdx.bench import triton_raw, workload  # noqa: E402
from marrowdx.image_checks import SERVED_SUFFIXES  # noqa: E402

#: Task weights: single-image requests dominate a lab's interactive use; whole patients
#: are the batch workload (each is many image calls plus one diagnosis call).
IMAGE_TASK_WEIGHT = 4
PATIENT_TASK_WEIGHT = 1
#: Upper bound for one RPC; a healthy 2-core server answers an image in well under this.
RPC_TIMEOUT_S = 120.0
#: gRPC message limit, matching the server's limit on encoded image bytes plus headroom.
MAX_MESSAGE_BYTES = config.MAX_IMAGE_BYTES + 1024 * 1024


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("marrowdx")
    group.add_argument(
        "--images-dir",
        default="",
        env_var="MARROWDX_LOADTEST_IMAGES",
        help="folder of JPEG/PNG fields of view (searched recursively); default: a simulated set",
    )
    group.add_argument(
        "--workload-images",
        type=int,
        default=workload.DEFAULT_LOADTEST_IMAGES,
        env_var="MARROWDX_LOADTEST_WORKLOAD_IMAGES",
        help="how many simulated images to generate when --images-dir is not given",
    )
    group.add_argument(
        "--fields-per-patient",
        type=int,
        default=workload.STANDARD_PATIENT_FIELDS,
        env_var="MARROWDX_LOADTEST_FIELDS",
        help="fields of view sent by one whole-patient task",
    )


_IMAGES: list[bytes] = []


@events.init.add_listener
def _load_images(environment, **_kwargs) -> None:
    """Load the images once per locust process, before any user starts."""
    options = environment.parsed_options
    if options is None:  # library use without a command line
        _IMAGES[:] = list(workload.simulated_workload(workload.DEFAULT_LOADTEST_IMAGES).images)
        return
    if options.images_dir:
        images = workload.load_images_dir(options.images_dir)
        if not images:
            raise LocustError(
                f"no images to send: {options.images_dir} holds no "
                f"{'/'.join(sorted(SERVED_SUFFIXES))} file (requests carry what the server "
                f"decodes)"
            )
    else:
        images = list(workload.simulated_workload(options.workload_images).images)
    _IMAGES[:] = images


def grpc_target(host: str | None) -> str:
    """``HOST:PORT`` from what a user may pass as --host (a bare target or a URL)."""
    if not host:
        raise LocustError("pass the server's gRPC address with --host HOST:PORT")
    for prefix in ("grpc://", "http://", "https://"):
        if host.startswith(prefix):
            host = host[len(prefix) :]
    return host.rstrip("/")


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Reports every unary call to locust, named by the Triton model it targets."""

    def __init__(self, environment) -> None:
        self.env = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        start = time.perf_counter()
        exception: BaseException | None = None
        response = None
        length = 0
        try:
            response = continuation(client_call_details, request)
            length = response.result().ByteSize()
        except grpc.RpcError as exc:
            exception = exc
        name = getattr(request, "model_name", "") or client_call_details.method
        self.env.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            response=response,
            context=None,
            exception=exception,
        )
        return response


class TritonUser(User):
    """A lab workstation: sends single fields of view and, less often, whole patients."""

    wait_time = between(0.0, 0.2)

    def __init__(self, environment) -> None:
        super().__init__(environment)
        from tritonclient.grpc import service_pb2_grpc

        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        channel = grpc.insecure_channel(grpc_target(self.host), options=options)
        self._channel = grpc.intercept_channel(channel, LocustInterceptor(environment))
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        parsed = environment.parsed_options
        self.fields_per_patient = (
            parsed.fields_per_patient if parsed is not None else workload.STANDARD_PATIENT_FIELDS
        )

    def on_stop(self) -> None:
        self._channel.close()

    def _infer_image(self, image: bytes) -> dict[str, np.ndarray] | None:
        try:
            response = self.stub.ModelInfer(triton_raw.image_request(image), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError:
            return None  # already reported as a failure by the interceptor
        return triton_raw.decode_response(response)

    @task(IMAGE_TASK_WEIGHT)
    def single_image(self) -> None:
        self._infer_image(random.choice(_IMAGES))

    @task(PATIENT_TASK_WEIGHT)
    def whole_patient(self) -> None:
        """All fields of one patient, then the diagnosis; reported as one 'patient' request."""
        start = time.perf_counter()
        fields = [random.choice(_IMAGES) for _ in range(self.fields_per_patient)]
        counts = np.zeros(config.N_CLASSES, dtype=np.float64)
        exception: Exception | None = None
        for image in fields:
            outputs = self._infer_image(image)
            if outputs is None:
                exception = RuntimeError("an image request of this patient failed")
                break
            counts += outputs[config.TENSORS.class_counts].reshape(-1)
        if exception is None:
            try:
                response = self.stub.ModelInfer(
                    triton_raw.diagnosis_request(counts), timeout=RPC_TIMEOUT_S
                )
                probs = triton_raw.decode_response(response)[config.TENSORS.diagnosis_probs]
                if probs.size != config.N_DIAGNOSES or not np.isfinite(probs).all():
                    exception = ValueError(f"bad diagnosis probabilities {probs!r}")
            except grpc.RpcError as exc:
                exception = exc
        self.environment.events.request.fire(
            request_type="patient",
            name=f"patient ({self.fields_per_patient} fields)",
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=0,
            response=None,
            context=None,
            exception=exception,
        )
