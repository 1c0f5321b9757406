"""Where the served time goes: Triton's statistics API, per model, as a before/after delta.

Triton counts cumulatively since load, so a measurement window is the difference of two
snapshots. Queue time says whether a model needs more instances (requests wait for a free
instance or for the batcher's delay); compute time split into input/infer/output says
whether the model itself or the data movement around it is the cost; inference_count over
execution_count is the batch size the dynamic batcher actually achieved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

_NS_PER_MS = 1e6
_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class ModelCounters:
    """Cumulative counters of one model version (Triton's ModelStatistics, flattened)."""

    inference_count: int
    execution_count: int
    counts: dict[str, int]  # phase -> number of requests
    ns: dict[str, int]  # phase -> total nanoseconds


@dataclass(frozen=True)
class ModelWindow:
    """One model over a measurement window; times are per request, in milliseconds."""

    model: str
    requests: int
    failures: int
    inferences: int
    executions: int
    mean_batch: float
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    total_ms: float  # end to end inside Triton (success duration)

    @property
    def compute_ms(self) -> float:
        return self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compute_ms"] = self.compute_ms
        d["queue_share"] = self.queue_ms / self.total_ms if self.total_ms > 0 else 0.0
        return d


def parse_statistics(stats_json: dict) -> dict[str, ModelCounters]:
    """Model name -> counters from ``get_inference_statistics(as_json=True)``, versions summed."""
    out: dict[str, ModelCounters] = {}
    for entry in stats_json.get("model_stats", []):
        name = entry["name"]
        infer = entry.get("inference_stats", {})
        counts = {p: int(infer.get(p, {}).get("count", 0)) for p in _PHASES}
        ns = {p: int(infer.get(p, {}).get("ns", 0)) for p in _PHASES}
        current = ModelCounters(
            inference_count=int(entry.get("inference_count", 0)),
            execution_count=int(entry.get("execution_count", 0)),
            counts=counts,
            ns=ns,
        )
        if name in out:  # several versions: add them up
            prev = out[name]
            current = ModelCounters(
                prev.inference_count + current.inference_count,
                prev.execution_count + current.execution_count,
                {p: prev.counts[p] + counts[p] for p in _PHASES},
                {p: prev.ns[p] + ns[p] for p in _PHASES},
            )
        out[name] = current
    return out


def window(before: dict[str, ModelCounters], after: dict[str, ModelCounters]) -> list[ModelWindow]:
    """Per-model averages over the interval between two snapshots (models with traffic only)."""
    result = []
    for name, a in sorted(after.items()):
        b = before.get(
            name, ModelCounters(0, 0, dict.fromkeys(_PHASES, 0), dict.fromkeys(_PHASES, 0))
        )
        requests = a.counts["success"] - b.counts["success"]
        if requests <= 0:
            continue
        inferences = a.inference_count - b.inference_count
        executions = a.execution_count - b.execution_count

        def per_request(phase: str, *, _a=a, _b=b, _n=requests) -> float:
            return (_a.ns[phase] - _b.ns[phase]) / _n / _NS_PER_MS

        result.append(
            ModelWindow(
                model=name,
                requests=requests,
                failures=a.counts["fail"] - b.counts["fail"],
                inferences=inferences,
                executions=executions,
                mean_batch=inferences / executions if executions > 0 else 0.0,
                queue_ms=per_request("queue"),
                compute_input_ms=per_request("compute_input"),
                compute_infer_ms=per_request("compute_infer"),
                compute_output_ms=per_request("compute_output"),
                total_ms=per_request("success"),
            )
        )
    return result


def snapshot(grpc_url: str, admin_key: str = "") -> dict[str, ModelCounters]:
    """Current counters of every model on the server at ``grpc_url``.

    The project's server restricts the statistics API to holders of its admin key.
    """
    import tritonclient.grpc as grpcclient

    from marrowdx.serving.server import ADMIN_KEY_HEADER

    # The server's header name already carries Triton's gRPC prefix (see serving.server).
    headers = {ADMIN_KEY_HEADER: admin_key} if admin_key else None
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        return parse_statistics(client.get_inference_statistics(as_json=True, headers=headers))
    finally:
        client.close()
