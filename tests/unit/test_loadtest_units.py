"""The load-test runner's pure parts: run-time parsing, soak judgement, memory sampling."""

from __future__ import annotations

import os

import pytest

from marrowdx.bench import loadtest


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30s", 30), ("5m", 300), ("1h30m", 5400)]
)
def test_parse_run_time_accepts_locust_syntax(text: str, seconds: float) -> None:
    assert loadtest.parse_run_time(text) == seconds


def test_parse_run_time_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="bad run time"):
        loadtest.parse_run_time("ten minutes")


def _samples(values: list[float], step: float = 5.0) -> list[tuple[float, float]]:
    return [(i * step, v) for i, v in enumerate(values)]


def test_soak_ignores_warmup_growth_and_passes_flat_memory() -> None:
    # Memory doubles during warm-up (models load), then stays flat within noise.
    values = [500, 900, 1000] + [1000, 1010, 995, 1005, 1002, 1008, 1001]
    outcome = loadtest.judge_soak(_samples(values), warmup_s=15.0, minutes=1.0)
    assert outcome.passed and abs(outcome.growth) < 0.02


def test_soak_fails_a_steady_leak() -> None:
    values = [1000 + 40 * i for i in range(12)]  # +40 MB every sample
    outcome = loadtest.judge_soak(_samples(values), warmup_s=10.0, minutes=1.0)
    assert not outcome.passed and outcome.growth > loadtest.SOAK_MAX_GROWTH


def test_soak_with_too_few_samples_fails_with_a_reason() -> None:
    outcome = loadtest.judge_soak(_samples([1000, 1000, 1000]), warmup_s=5.0, minutes=0.1)
    assert not outcome.passed and "soak longer" in outcome.notes[0]


def test_tree_rss_counts_this_process() -> None:
    assert loadtest.tree_rss_mb(os.getpid()) > 1.0


def test_locust_command_is_headless_and_writes_reports(tmp_path) -> None:
    cmd = loadtest.locust_command(
        "127.0.0.1:1",
        users=2,
        spawn_rate=1,
        run_time="5s",
        html=tmp_path / "r.html",
        json_file=tmp_path / "s.json",
    )
    assert "--headless" in cmd and str(loadtest.LOCUSTFILE) in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1:1"
    assert loadtest.LOCUSTFILE.exists()
