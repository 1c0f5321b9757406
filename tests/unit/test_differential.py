"""Counts -> differential and diagnosis inputs: one function, one zero-cells rule, and the
three callers (client, raw-gRPC load test, evaluation) send the model the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from marrowdx import config, differential, taxonomy
from marrowdx.errors import InputError


def _counts(**by_class: int) -> np.ndarray:
    counts = np.zeros(config.N_CLASSES)
    for name, n in by_class.items():
        counts[taxonomy.CLASS_INDEX[name]] = n
    return counts


def test_fractions_are_shares_of_the_counted_cells() -> None:
    f = differential.fractions(_counts(lymphocyte=3, monocyte=1))
    assert f[taxonomy.CLASS_INDEX["lymphocyte"]] == pytest.approx(0.75)
    assert f[taxonomy.CLASS_INDEX["monocyte"]] == pytest.approx(0.25)
    assert f.sum() == pytest.approx(1.0)


def test_zero_cells_give_zero_fractions_and_zero_total_not_nan() -> None:
    inputs = differential.diagnosis_inputs(np.zeros(config.N_CLASSES))
    assert np.all(inputs.fractions == 0) and not np.isnan(inputs.fractions).any()
    assert inputs.total_cells.tolist() == [0.0]
    assert inputs.has_cells is False


def test_one_patient_gives_unbatched_float32_tensors_named_as_the_contract() -> None:
    inputs = differential.diagnosis_inputs(_counts(myelocytic_blast=5, lymphocyte=15))
    t = config.TENSORS
    shapes = {name: a.shape for name, a in inputs.tensors().items()}
    assert shapes == {
        t.fractions: (config.N_CLASSES,),
        t.total_cells: (1,),
        t.lab_values: (config.N_LAB_VALUES,),
        t.lab_mask: (config.N_LAB_VALUES,),
    }
    assert all(a.dtype == np.float32 for a in inputs.tensors().values())
    assert inputs.total_cells.tolist() == [20.0] and inputs.has_cells is True


def test_a_batch_keeps_its_rows_apart_and_zero_rows_stay_zero() -> None:
    batch = np.stack([_counts(lymphocyte=2), np.zeros(config.N_CLASSES), _counts(monocyte=4)])
    inputs = differential.diagnosis_inputs(batch)
    assert inputs.fractions.shape == (3, config.N_CLASSES)
    assert inputs.total_cells[:, 0].tolist() == [2.0, 0.0, 4.0]
    assert inputs.has_cells.tolist() == [True, False, True]
    assert inputs.fractions[1].sum() == 0
    assert inputs.fractions[[0, 2]].sum(axis=1) == pytest.approx([1.0, 1.0])
    assert inputs.lab_mask.shape == (3, config.N_LAB_VALUES)


def test_labs_are_placed_in_the_models_order_with_a_mask() -> None:
    first, second = config.LAB_VALUE_NAMES[:2]
    inputs = differential.diagnosis_inputs(_counts(lymphocyte=1), {first: 2.5, second: None})
    assert inputs.lab_values[0] == pytest.approx(2.5) and inputs.lab_mask.tolist()[:2] == [1, 0]


@pytest.mark.parametrize(
    "labs, message",
    [({"no_such_lab": 1.0}, "unknown lab"), ({config.LAB_VALUE_NAMES[0]: float("nan")}, "finite")],
)
def test_bad_labs_are_refused_by_name(labs, message) -> None:
    with pytest.raises(InputError, match=message):
        differential.diagnosis_inputs(_counts(lymphocyte=1), labs)


@pytest.mark.parametrize(
    "counts, message",
    [
        (np.zeros(config.N_CLASSES - 1), "shape"),
        (np.full(config.N_CLASSES, -1.0), "non-negative"),
        (np.full(config.N_CLASSES, np.inf), "finite"),
        (np.float64(3.0), "shape"),
    ],
)
def test_malformed_counts_are_refused(counts, message) -> None:
    with pytest.raises(InputError, match=message):
        differential.diagnosis_inputs(counts)


def test_the_raw_grpc_bench_sends_the_same_inputs_as_the_client() -> None:
    pytest.importorskip("tritonclient.grpc", reason="the raw request needs tritonclient")
    from marrowdx.bench.triton_raw import diagnosis_request

    for counts in (_counts(monocytic_blast=7, monocyte=3), np.zeros(config.N_CLASSES)):
        request = diagnosis_request(counts)
        sent = {
            tensor.name: np.frombuffer(raw, np.float32).reshape(tuple(tensor.shape))
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        expected = differential.diagnosis_inputs(counts[None, :]).tensors()
        assert sent.keys() == expected.keys()
        for name, array in expected.items():
            np.testing.assert_array_equal(sent[name], array, err_msg=name)


def test_the_clients_report_fractions_are_the_same_function() -> None:
    pytest.importorskip("tritonclient.grpc", reason="the client package needs tritonclient")
    from marrowdx.client.aggregate import build_report

    for counts in (_counts(lymphocyte=3, monocyte=1), np.zeros(config.N_CLASSES, np.int64)):
        report = build_report("P", [], {}, counts.astype(np.int64), None, "no cells")
        expected = differential.fractions(counts)
        assert [report.fractions[c] for c in taxonomy.CLASSES] == pytest.approx(expected.tolist())
