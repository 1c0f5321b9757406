"""The bench's outputs: one JSON document (ratios as top-level keys) and a PNG plot.

The JSON is the artefact the README's performance section and CI read, so its top-level
keys are stable: ``served_over_limit``, ``served_over_peer``, ``limit``, ``peer``,
``served``, ``triton_statistics``, ``gpu``, ``environment``, ``goals``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx.bench.measure import LevelResult
from marrowdx.bench.workload import STANDARD_PATIENT_FIELDS

#: Goals of the served stack on the 2-core CPU default.
GOAL_SERVED_OVER_LIMIT = 0.85
GOAL_SERVED_OVER_PEER = 1.5
PLOT_DPI = 120


@dataclass
class BenchResult:
    limit: LevelResult  # the best in-process configuration
    limit_by_config: dict[str, LevelResult]  # "P processes x T threads, batch B" -> result
    peer: list[LevelResult]  # per concurrency
    served: list[LevelResult]  # per concurrency
    triton_statistics: dict[int, list[dict]]  # concurrency -> per-model window
    workload: dict
    environment: dict
    gpu: dict | None = None
    gpu_reason: str = ""
    notes: list[str] = field(default_factory=list)
    #: Interleaved repeats of the three best configurations (limit, peer, served images/s),
    #: so slow drifts in background load hit all three alike; the ratios are their medians.
    rounds: list[dict[str, float]] = field(default_factory=list)
    #: The slide workload (``marrowdx.bench.slides.SlideBench.to_dict``), when it ran.
    slides: dict | None = None

    @staticmethod
    def best(levels: list[LevelResult]) -> LevelResult:
        return max(levels, key=lambda r: r.images_per_s)

    def sweep_ratios(self) -> dict[str, float]:
        """Ratios of the best levels of the sweeps (measured minutes apart)."""
        served = self.best(self.served).images_per_s
        return {
            "served_over_limit": ratio(served, self.limit.images_per_s),
            "served_over_peer": ratio(served, self.best(self.peer).images_per_s),
        }

    def ratios(self) -> dict[str, float]:
        """Medians over the interleaved rounds when there are any, else the sweeps' ratios."""
        if not self.rounds:
            return self.sweep_ratios()
        return {
            "served_over_limit": finite_median(
                [ratio(r["served"], r["limit"]) for r in self.rounds]
            ),
            "served_over_peer": finite_median([ratio(r["served"], r["peer"]) for r in self.rounds]),
        }

    def cpu_efficiency(self) -> dict[str, float]:
        """Ratios of CPU time per image (other side / served): how much work the served stack
        spends per image, independent of how many cores it won on a shared, loaded host."""
        if self.rounds:

            def side(name: str) -> float:
                return finite_median(
                    [r.get(f"{name}_cpu_ms_per_image", math.nan) for r in self.rounds]
                )

            limit, peer, served = side("limit"), side("peer"), side("served")
        else:
            limit, peer, served = (
                _cpu_ms(self.limit),
                _cpu_ms(self.best(self.peer)),
                _cpu_ms(self.best(self.served)),
            )
        return {
            "limit_cpu_ms_per_image": limit,
            "peer_cpu_ms_per_image": peer,
            "served_cpu_ms_per_image": served,
            "served_over_limit": ratio(limit, served),
            "served_over_peer": ratio(peer, served),
        }

    def to_dict(self) -> dict:
        ratios = self.ratios()
        limit_config = next(k for k, r in self.limit_by_config.items() if r is self.limit)
        return {
            **ratios,
            "goals": {
                "served_over_limit": GOAL_SERVED_OVER_LIMIT,
                "served_over_peer": GOAL_SERVED_OVER_PEER,
                "met": ratios["served_over_limit"] >= GOAL_SERVED_OVER_LIMIT
                and ratios["served_over_peer"] >= GOAL_SERVED_OVER_PEER,
            },
            "standard_patient": {
                "fields_of_view": STANDARD_PATIENT_FIELDS,
                "size": self.workload["size"],
            },
            "limit": {
                "best_config": limit_config,
                "best_batch_size": self.limit.concurrency,
                **self.limit.to_dict(),
                "by_config": {k: r.to_dict() for k, r in self.limit_by_config.items()},
            },
            "peer": {
                "best": self.best(self.peer).to_dict(),
                "by_concurrency": [r.to_dict() for r in self.peer],
            },
            "served": {
                "best": self.best(self.served).to_dict(),
                "by_concurrency": [r.to_dict() for r in self.served],
            },
            "ratio_method": "median of interleaved rounds" if self.rounds else "best of sweeps",
            "sweep_ratios": self.sweep_ratios(),
            "cpu_efficiency": self.cpu_efficiency(),
            "rounds": self.rounds,
            "triton_statistics": {str(c): rows for c, rows in self.triton_statistics.items()},
            "workload": self.workload,
            "environment": self.environment,
            "gpu": self.gpu,
            "gpu_reason": self.gpu_reason if self.gpu is None else "",
            "notes": self.notes,
            "slides": self.slides,
        }


def ratio(a: float, b: float) -> float:
    """a / b, NaN when it cannot be computed (no b, or a not finite)."""
    return a / b if b > 0 and math.isfinite(a) else math.nan


def _cpu_ms(level: LevelResult) -> float:
    return 1000.0 * level.cpu_seconds / level.images if level.images else math.nan


def finite_median(values: list[float]) -> float:
    """Median of the finite values (NaN when none): a failed round does not skew it."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def write_json(result: BenchResult, path: Path) -> dict:
    return write_doc(result.to_dict(), path)


def write_doc(doc: dict, path: Path) -> dict:
    """Write a bench document; returns it as given (NaN, not null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is not JSON: a ratio that cannot be computed is written as null.
    path.write_text(json.dumps(_nan_to_none(doc), indent=2) + "\n")
    return doc


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def write_plot(result: BenchResult, path: Path) -> Path:
    """Throughput and p95 latency against concurrency; the limit as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, levels, marker in (
        ("served (Triton)", result.served, "o"),
        ("peer", result.peer, "s"),
    ):
        xs = [r.concurrency for r in levels]
        ax_tp.plot(xs, [r.images_per_s for r in levels], marker=marker, label=label)
        ax_lat.plot(xs, [r.latency()["p95"] for r in levels], marker=marker, label=label)
    ax_tp.axhline(
        result.limit.images_per_s, linestyle="--", color="grey", label="limit (in-process)"
    )
    ratios = result.ratios()
    ax_tp.set_title(
        f"throughput  served/limit={ratios['served_over_limit']:.2f}"
        f"  served/peer={ratios['served_over_peer']:.2f}"
    )
    ax_tp.set_xlabel("concurrent requests")
    ax_tp.set_ylabel("images / s")
    ax_lat.set_title("p95 latency")
    ax_lat.set_xlabel("concurrent requests")
    ax_lat.set_ylabel("ms")
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # 1 2 4, not 2^0
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path
