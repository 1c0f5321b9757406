"""The gate workload: what the field-quality measures cost the served stack (goal: at most
:data:`GOAL_MAX_GATE_COST` of served throughput).

The in-process cost of the measures (``marrowdx.preprocess.QualitySpec``; docs/performance.md)
leaves out what serving adds or hides: the preprocess step shares 2 cores with the detector,
the classifier, Triton and the client, so its extra milliseconds may or may not show up as
lost fields/s. So the same fields go through two Triton servers on the same models, one as built
and one whose preprocess model serves a constant ``FIELD_QUALITY``
(:func:`gate_off_repository`), at one client concurrency, in interleaved rounds with the order
swapped every round so drifting background load hits both alike. Both servers are up before
the first round; the idle one costs next to nothing.

``off_over_on`` (median of the rounds' ratios) and ``gate_cost = 1 - on/off`` go into the
JSON under ``gate``, with each side's fields/s, CPU per field (client and server tree: the
steadier figure on a loaded host) and Triton's per-model statistics of the last round.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx import config, contract
from marrowdx.bench.report import finite_median, ratio
from marrowdx.errors import RepositoryError
from marrowdx.serving.model_config import check_repository

#: Goal: the measures may cost at most this share of served throughput.
GOAL_MAX_GATE_COST = 0.05
#: Client concurrency of both sides: the served sweep's best level on 2 cores is 16-32.
DEFAULT_GATE_CONCURRENCY = 16
#: The two servers, in the order of the first round.
SIDES = ("on", "off")

#: Appended to the preprocess config of the variant: a map field may be given again in
#: Triton's text format, so the source config's own ``parameters`` block stays as it is.
GATE_OFF_PARAMETER = (
    "\n# marrowdx bench --workload gate: the field-quality measures off (benchmarks only)\n"
    'parameters {{ key: "{key}" value: {{ string_value: "0" }} }}\n'
)

#: A bench server: (gRPC url, admin key, pid or None), as ``harness.bench_server`` returns.
Server = tuple[str, str, int | None]


def gate_off_repository(repository: Path, out: Path) -> Path:
    """``repository`` with the field-quality measures off, written into ``out``: every model
    folder is a link to the original except the preprocess model's, which holds a config with
    ``measure_field_quality`` "0" and links to the rest. Links, not copies: the same model
    files serve both sides. Checked against the tensor contract, which it must not change."""
    from marrowdx.serving.python_models import MEASURE_FIELD_QUALITY

    repository, out = Path(repository).resolve(), Path(out)
    models = sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    if config.MODELS.preprocess not in {p.name for p in models}:
        raise RepositoryError(f"{repository} has no {config.MODELS.preprocess} model")
    out.mkdir(parents=True, exist_ok=True)
    for model in models:
        if model.name != config.MODELS.preprocess:
            (out / model.name).symlink_to(model, target_is_directory=True)
            continue
        (out / model.name).mkdir()
        for entry in model.iterdir():
            if entry.name != "config.pbtxt":
                (out / model.name / entry.name).symlink_to(entry)
        text = (model / "config.pbtxt").read_text()
        param = GATE_OFF_PARAMETER.format(key=MEASURE_FIELD_QUALITY)
        (out / model.name / "config.pbtxt").write_text(text + param)
    check_repository(out, ("cpu",))
    return out


async def _served_quality(url: str, image: bytes) -> dict[str, float] | None:
    from marrowdx.client import AsyncMarrowClient

    async with AsyncMarrowClient(url) as client:
        await client.wait_until_ready()
        return (await client.analyse_image(image, "gate check")).quality


def check_sides(urls: Mapping[str, str], image: bytes) -> None:
    """Each server does what its side says: "off" answers the constant, "on" measures. Why: a
    parameter that did not reach the model would have the bench compare a server with itself
    and call the measures free."""
    from marrowdx.errors import ServerError
    from marrowdx.preprocess import UNMEASURED_QUALITY

    unmeasured = dict(zip(contract.QUALITY_FIELDS, UNMEASURED_QUALITY, strict=True))
    for side, url in urls.items():
        got = asyncio.run(_served_quality(url, image))
        if (got == unmeasured) != (side == "off"):
            raise ServerError(f"gate bench: the '{side}' server at {url} answered {got}")


@dataclass
class GateBench:
    """Both sides' fields/s per round; the ratio is the median of the rounds' ratios."""

    concurrency: int
    images: int  # distinct fields cycled through (a measure counts whole passes over them)
    rounds: list[dict[str, float]] = field(default_factory=list)
    #: side -> Triton's per-model statistics over that side's last measured window.
    triton_statistics: dict[str, list[dict]] = field(default_factory=dict)

    def off_over_on(self) -> float:
        return finite_median(
            [ratio(r["off_fields_per_s"], r["on_fields_per_s"]) for r in self.rounds]
        )

    def median(self, key: str) -> float:
        return finite_median([r[key] for r in self.rounds])

    def to_dict(self) -> dict:
        off_over_on = self.off_over_on()
        cost = 1.0 - 1.0 / off_over_on if off_over_on > 0 else math.nan  # "off" fields/s lost
        on_cpu, off_cpu = self.median("on_cpu_ms_per_field"), self.median("off_cpu_ms_per_field")
        return {
            "off_over_on": off_over_on,
            "gate_cost": cost,
            "goal": {"max_gate_cost": GOAL_MAX_GATE_COST, "met": cost <= GOAL_MAX_GATE_COST},
            "on_fields_per_s": self.median("on_fields_per_s"),
            "off_fields_per_s": self.median("off_fields_per_s"),
            "on_cpu_ms_per_field": on_cpu,
            "off_cpu_ms_per_field": off_cpu,
            "measures_cpu_ms_per_field": on_cpu - off_cpu,
            "concurrency": self.concurrency,
            "images": self.images,
            "rounds": self.rounds,
            "triton_statistics": self.triton_statistics,
        }


def measure_gate(
    servers: Mapping[str, Server],
    images: Sequence[bytes],
    *,
    concurrency: int = DEFAULT_GATE_CONCURRENCY,
    rounds: int = 3,
    log: Callable[[str], None] = lambda _msg: None,
) -> GateBench:
    """``rounds`` interleaved on/off measures of ``images`` at ``concurrency`` clients, after
    one unrecorded warm-up measure per side (connections, DALI and ONNX Runtime buffers)."""
    from marrowdx.bench.served import ServedLevel, measure_served

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")

    def measure(side: str) -> ServedLevel:
        url, admin_key, pid = servers[side]
        pids = [pid] if pid else []
        return measure_served(url, images, [concurrency], len(images), admin_key, pids)[0]

    for side in SIDES:
        measure(side)
    bench = GateBench(concurrency, len(images))
    for r in range(rounds):
        row: dict[str, float] = {}
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            level = measure(side)
            result = level.result.to_dict()
            row[f"{side}_fields"] = result["images"]
            row[f"{side}_failures"] = result["failures"]
            row[f"{side}_fields_per_s"] = result["images_per_s"]
            row[f"{side}_cpu_ms_per_field"] = result["cpu_ms_per_image"]
            bench.triton_statistics[side] = [w.to_dict() for w in level.statistics]
        bench.rounds.append(row)
        log(
            f"gate round {r + 1}: on {row['on_fields_per_s']:.2f}, "
            f"off {row['off_fields_per_s']:.2f} fields/s"
        )
    return bench


def summary_line(gate: dict, environment: dict) -> str:
    """One line from ``GateBench.to_dict()`` and the bench's environment."""
    goal = gate["goal"]
    return (
        f"gate: {gate['on_fields_per_s']:.1f} fields/s with the field-quality measures, "
        f"{gate['off_fields_per_s']:.1f} without: off/on {gate['off_over_on']:.3f}, the gate "
        f"costs {100 * gate['gate_cost']:.1f}% of served throughput (goal <= "
        f"{100 * goal['max_gate_cost']:g}%: {'met' if goal['met'] else 'not met'}); CPU per "
        f"field {gate['on_cpu_ms_per_field']:.1f} vs {gate['off_cpu_ms_per_field']:.1f} ms; "
        f"{gate['concurrency']} clients, {len(gate['rounds'])} rounds; load average "
        f"{environment['load_average_1m']:.1f} on {environment['cpu_cores']} cores"
    )


def run_gate_bench(args, log) -> int:
    """``marrowdx bench --workload gate``: two servers of its own (``--url`` is refused: the
    other side needs the same models), ``--images`` fields, ``--rounds`` rounds."""
    import contextlib
    import os
    import tempfile

    from marrowdx.bench.harness import bench_repository, bench_server, busy_note, environment
    from marrowdx.bench.report import write_doc
    from marrowdx.bench.workload import simulated_workload
    from marrowdx.errors import InputError

    if args.url:
        raise InputError("--workload gate starts its own two servers (measures on and off)")
    if args.rounds < 1:
        raise InputError(f"--workload gate needs --rounds >= 1, got {args.rounds}")
    repository = bench_repository(args)
    load0 = os.getloadavg()[0]
    wl = simulated_workload(args.images)
    images = list(wl.images)
    log(f"gate: {len(images)} fields, {args.gate_concurrency} clients, {args.rounds} rounds")
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="marrowdx-gate-off-"))
        variant = gate_off_repository(repository, Path(folder) / "model_repository")
        servers = {
            "on": bench_server(stack, args, repository),
            "off": bench_server(stack, args, variant),
        }
        check_sides({side: s[0] for side, s in servers.items()}, images[0])
        bench = measure_gate(
            servers, images, concurrency=args.gate_concurrency, rounds=args.rounds, log=log
        )
    env = environment() | {"repository": str(repository), "load_average_1m_start": load0}
    note = busy_note(load0, env, steadier="CPU per field (on_/off_cpu_ms_per_field)")
    doc = {
        "gate": bench.to_dict(),
        "workload": wl.describe(),
        "environment": env,
        "notes": [note] if note else [],
    }
    write_doc(doc, args.json)
    print(summary_line(doc["gate"], env))
    print(f"JSON: {args.json}")
    return 0
