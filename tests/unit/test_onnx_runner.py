"""The ONNX Runtime wrappers the served models and the in-process pipeline share."""

from __future__ import annotations

import numpy as np
import pytest

from marrowdx import config
from marrowdx.serving.onnx_runner import (
    BoxSlotClassifier,
    ChunkedRunner,
    OnnxRunner,
    SessionThreads,
    open_runner,
)
from tests.helpers import onnx_graphs

T = config.TENSORS
S = config.INPUT_SIZE
ONE_THREAD = SessionThreads(intra_op=1, inter_op=1)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict:
    return onnx_graphs.write_all(tmp_path_factory.mktemp("onnx"))


def _pixels(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (n, 3, S, S), dtype=np.uint8)


@pytest.mark.parametrize("per_run", [1, 2, 8])
def test_chunked_runs_equal_one_whole_batch(graphs, per_run: int) -> None:
    plain = OnnxRunner(graphs["detector"], ONE_THREAD)
    chunked = ChunkedRunner(plain, per_run)
    pixels = _pixels(5)
    want = plain.run({T.pixels: pixels})
    got = chunked.run({T.pixels: pixels})
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_open_runner_wraps_each_graph_by_its_inputs(graphs) -> None:
    assert isinstance(open_runner(graphs["detector"], ONE_THREAD), ChunkedRunner)
    assert isinstance(open_runner(graphs["classifier"], ONE_THREAD), BoxSlotClassifier)
    assert isinstance(open_runner(graphs["diagnosis"], ONE_THREAD), OnnxRunner)


def test_box_slot_segments_group_consecutive_equal_counts() -> None:
    assert BoxSlotClassifier.segments([32, 32, 64, 32]) == [(0, 2), (2, 3), (3, 4)]
    assert BoxSlotClassifier.slots_needed(np.array([0]), 256) == 32
    assert BoxSlotClassifier.slots_needed(np.array([33]), 256) == 64
    assert BoxSlotClassifier.slots_needed(np.array([250]), 256) == 256
