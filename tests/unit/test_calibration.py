"""Temperature scaling and ECE (marrowdx.training.calibration) on synthetic logits whose
true temperature is known, and the temperature buffers of the served graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marrowdx import config
from marrowdx.models.networks import (
    CellClassifier,
    ClassifierSpec,
    DiagnosisModel,
    DiagnosisSpec,
    RealCellTemperature,
    Temperature,
)
from marrowdx.training import calibration as cal


def _overconfident(temperature: float, n: int = 20000, k: int = 10, seed: int = 0):
    """Labels drawn from softmax(z); the 'model' reports z * temperature, so dividing its
    logits by exactly ``temperature`` restores calibrated probabilities."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, k))
    p = cal.softmax(z)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z * temperature, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_a_known_temperature(true_t: float) -> None:
    logits, labels = _overconfident(true_t)
    fitted = cal.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    # the fitted T is the NLL minimum: a little either side is worse
    nll = cal.negative_log_likelihood(logits, labels, fitted)
    assert nll < cal.negative_log_likelihood(logits, labels, fitted * 1.2)
    assert nll < cal.negative_log_likelihood(logits, labels, fitted / 1.2)


def test_calibrate_head_lowers_ece_of_overconfident_logits() -> None:
    logits, labels = _overconfident(3.0)
    head = cal.calibrate_head(logits, labels)
    assert head.ece_before > 0.1, "3x sharpened logits must be visibly over-confident"
    assert head.ece_after < 0.02
    assert head.nll_after < head.nll_before and head.n_samples == len(labels)


def test_fit_stays_in_range_on_separable_data() -> None:
    logits = np.array([[5.0, 0.0], [0.0, 5.0]])
    assert cal.fit_temperature(logits, np.array([0, 1])) == cal.MIN_TEMPERATURE
    assert cal.fit_temperature(logits, np.array([1, 0])) == cal.MAX_TEMPERATURE


def test_separable_held_out_data_leave_the_temperature_at_one() -> None:
    logits = np.array([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0]] * 10)
    head = cal.calibrate_head(logits, np.array([0, 1, 2] * 10))
    assert head.separable and head.temperature == 1.0
    assert head.ece_after == pytest.approx(head.ece_before)
    assert not cal.calibrate_head(*_overconfident(2.0)).separable


def test_a_separable_class_head_is_fitted_as_if_its_least_sure_sample_were_wrong() -> None:
    """No error in N held-out cells does not show an error rate of 0: the class head is
    then fitted with its least sure sample (the smallest margin) taken as its runner-up
    class, which sharpens it, but not without limit. The other heads keep T = 1, and a head
    with a real error is fitted as before."""
    rng = np.random.default_rng(3)
    labels = np.arange(300) % 3
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), labels] += 8.0
    logits[7] = [0.0, 2.5, 1.8]  # the least sure sample (label 1), still right
    moved = cal.least_sure_made_wrong(logits, labels)
    assert (moved != labels).sum() == 1 and moved[7] != labels[7]
    head = cal.calibrate_head(logits, labels, least_sure_wrong=True)
    assert head.separable and cal.MIN_TEMPERATURE < head.temperature < 1.0
    assert head.temperature == pytest.approx(cal.fit_temperature(logits, moved))
    assert cal.calibrate_head(logits, labels).temperature == 1.0  # the other heads
    assert moved[7] == 2  # its runner-up
    real_error = cal.calibrate_head(*_overconfident(2.0), least_sure_wrong=True)
    assert real_error.temperature == pytest.approx(
        cal.calibrate_head(*_overconfident(2.0)).temperature
    )


def test_ece_formula_on_a_hand_worked_case() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    # bin (0.8, 0.9]: accuracy 0.5 vs confidence 0.9 -> 0.5 * 0.4;
    # bin (0.5, 0.6]: accuracy 1.0 vs confidence 0.6 -> 0.5 * 0.4
    assert cal.expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.4)
    assert cal.expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0
    assert np.isnan(cal.expected_calibration_error(np.zeros((0, 3)), np.zeros(0)))


def test_ece_of_calibrated_probabilities_is_small() -> None:
    logits, labels = _overconfident(1.0, seed=3)
    assert cal.expected_calibration_error(cal.softmax(logits), labels) < 0.02


def test_bad_inputs_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="do not pair up"):
        cal.fit_temperature(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="labels outside"):
        cal.fit_temperature(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="no held-out samples"):
        cal.fit_temperature(np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        cal.fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="positive finite"):
        Temperature().set(0.0)


def test_binary_heads_and_uncalibrate() -> None:
    z = np.linspace(-6, 6, 13)
    two = cal.binary_as_two_class(z)
    np.testing.assert_allclose(cal.softmax(two / 2.0)[:, 1], 1 / (1 + np.exp(-z / 2.0)))
    logits = np.random.default_rng(1).normal(0, 3, (50, 33))
    served = cal.softmax(logits / 1.7)
    np.testing.assert_allclose(cal.uncalibrate(served, 1.7), cal.softmax(logits), atol=1e-9)


def test_classifier_graph_serves_softmax_of_logits_over_t() -> None:
    torch.manual_seed(0)
    model = CellClassifier(ClassifierSpec(widths=(8, 8, 8), hidden=8)).eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (1, 3, config.INPUT_SIZE, config.INPUT_SIZE), generator=g)
    pixels = pixels.to(torch.uint8)
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 60.0], [100.0, 80.0, 140.0, 130.0]]])
    num = torch.tensor([[2]], dtype=torch.int32)
    with torch.no_grad():
        _, _, counts_t1, _ = model(pixels, boxes, num)
        model.class_temperature.set(2.5)
        model.attribute_temperature.set(0.7)
        probs, attrs, counts, _ = model(pixels, boxes, num)
        cls, att = model.logits(model.normalize(pixels), boxes)
    torch.testing.assert_close(probs, torch.softmax(cls / 2.5, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attrs, torch.sigmoid(att / 0.7), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(counts, counts_t1)  # temperature never changes the argmax


def test_diagnosis_graph_and_checkpoints_carry_the_temperature() -> None:
    torch.manual_seed(0)
    model = DiagnosisModel(DiagnosisSpec(hidden=8)).eval()
    model.temperature.set(3.0)
    f = torch.softmax(torch.randn(4, config.N_CLASSES), -1)
    inputs = (f, torch.full((4, 1), 200.0), torch.zeros(4, 4), torch.zeros(4, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), torch.softmax(model.logits(*inputs) / 3.0, -1))
    state = model.state_dict()
    assert float(state["temperature.value"]) == 3.0
    reloaded = DiagnosisModel(DiagnosisSpec(hidden=8))
    reloaded.load_state_dict(state)
    assert float(reloaded.temperature.value) == 3.0
    # a checkpoint from before calibration (no temperature key) loads as T = 1
    del state["temperature.value"]
    reloaded.load_state_dict(state)
    assert float(reloaded.temperature.value) == 1.0


def test_is_calibrated_reads_the_version() -> None:
    assert not cal.is_calibrated(None) and not cal.is_calibrated({})
    assert not cal.is_calibrated({cal.METADATA_KEY: {"version": cal.CALIBRATION_VERSION - 1}})
    assert cal.is_calibrated({cal.METADATA_KEY: {"version": cal.CALIBRATION_VERSION}})


def test_checkpoints_keep_the_fitted_temperature(tmp_path) -> None:
    from marrowdx.models.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

    model = CellClassifier(ClassifierSpec(widths=(8, 8, 8), hidden=8))
    model.class_temperature.set(1.7)
    meta = {
        "checkpoint_format": CHECKPOINT_FORMAT,
        cal.METADATA_KEY: {"version": cal.CALIBRATION_VERSION},
    }
    path = save_checkpoint(tmp_path / "classifier.pt", "classifier", model, meta)
    loaded = load_checkpoint(path)
    assert float(loaded.model.class_temperature.value) == pytest.approx(1.7)
    assert float(loaded.model.attribute_temperature.value) == 1.0
    assert cal.is_calibrated(loaded.metadata)


def test_served_temperature_defaults_to_one() -> None:
    assert cal.served_temperature(None, "classes") == 1.0
    assert cal.served_temperature({"classes": {"temperature": 2.0}}, "classes") == 2.0
    assert cal.served_temperature({"classes": {"temperature": 2.0}}, "diagnosis") == 1.0
    probs = cal.softmax(np.array([[4.0, 0.0], [0.0, 4.0]]) / 2.0)
    before, after = cal.ece_before_after(probs, np.array([0, 1]), 2.0)
    assert after == pytest.approx(1 - probs.max(1).mean())
    assert before == pytest.approx(1 - cal.softmax(np.array([[4.0, 0.0]])).max())


def test_real_cell_temperature_is_one_temperature_until_fitted() -> None:
    """Unfitted (or loaded from a checkpoint without a gate) it divides every cell by one T;
    fitted, each cell's T moves from the simulated cells' to the real cells' with the gate;
    set() alone clears the real fit."""
    head = RealCellTemperature(features=4)
    head.set(0.5)
    logits, hidden = torch.randn(3, 2, 33), torch.randn(3, 2, 4)
    torch.testing.assert_close(head(logits, hidden), logits / 0.5)
    head.set_real(2.0, torch.tensor([10.0, 0.0, 0.0, 0.0]), 0.0)
    far = torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]])
    torch.testing.assert_close(
        head.cell_temperatures(far), torch.tensor([2.0, 0.5]), atol=1e-6, rtol=0
    )
    state = head.state_dict()
    reloaded = RealCellTemperature(features=4)
    reloaded.load_state_dict(state)
    torch.testing.assert_close(reloaded(logits, hidden), head(logits, hidden))
    for key in ("real_offset", "gate_weight", "gate_bias"):
        del state[key]  # a checkpoint from before the real-cell fit
    reloaded.load_state_dict(state)
    torch.testing.assert_close(reloaded(logits, hidden), logits / 0.5)
    head.set(0.8)
    torch.testing.assert_close(head(logits, hidden), logits / 0.8)
    with pytest.raises(ValueError, match="gate"):
        head.set_real(2.0, torch.zeros(3), 0.0)


def _population(temperature: float, centre: float, n: int, seed: int):
    """Features around ``centre`` and logits whose labels are drawn from softmax(z / T)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(0.0, 1.0, (n, 6))
    features[:, 0] += centre
    z = rng.normal(0.0, 3.0, (n, config.N_CLASSES))
    p = cal.softmax(z / temperature)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    allowed = np.zeros((n, config.N_CLASSES), bool)
    allowed[np.arange(n), labels] = True
    return features, z, labels, allowed


def test_real_temperature_fit_finds_each_population_s_temperature() -> None:
    """Simulated cells right at T = 0.5, real cells (elsewhere in feature space) at T = 2:
    the gate tells them apart, the real fit finds T near 2, and the simulated cells keep
    theirs. Labels as wide as "any white cell" say nothing and are not fitted on."""
    sim_f, sim_z, sim_y, _ = _population(0.5, -3.0, 3000, seed=1)
    real_f, real_z, _, real_a = _population(2.0, 3.0, 1500, seed=2)
    t_sim = cal.fit_temperature(sim_z, sim_y)
    assert t_sim == pytest.approx(0.5, rel=0.1)
    fit = cal.fit_real_temperature(sim_f, cal.RealCells(real_f, real_z, real_a), t_sim)
    assert fit is not None
    assert fit.temperature == pytest.approx(2.0, rel=0.15)
    assert fit.nll_after < fit.nll_before
    assert fit.realness_real > 0.9 and fit.realness_simulated < 0.1
    assert fit.n_samples == 1500 and "gate_weight" not in fit.as_dict()
    # written into a classifier, its graph serves each population's temperature
    model = CellClassifier(ClassifierSpec(widths=(8, 8, 8), hidden=6)).eval()
    model.class_temperature.set(t_sim)
    fit.apply(model)
    temps = model.class_temperature.cell_temperatures(
        torch.from_numpy(np.r_[sim_f, real_f]).float()
    )
    assert float(temps[:3000].median()) == pytest.approx(t_sim, rel=0.05)
    assert float(temps[3000:].median()) == pytest.approx(fit.temperature, rel=0.05)
    # "white cell" rows (most classes allowed) and too few narrow rows: no real fit
    wide = np.ones_like(real_a)
    assert cal.fit_real_temperature(sim_f, cal.RealCells(real_f, real_z, wide), t_sim) is None
    few = cal.RealCells(real_f[:10], real_z[:10], real_a[:10])
    assert cal.fit_real_temperature(sim_f, few, t_sim) is None


def test_real_temperature_is_never_sharper_than_the_simulated_one() -> None:
    """Real cells that are easier than the simulated ones keep the simulated T: partial
    labels cannot show confident errors inside a group, so a sharper fit is not trusted."""
    sim_f, sim_z, sim_y, _ = _population(2.0, -2.0, 2000, seed=3)
    real_f, real_z, _, real_a = _population(0.5, 2.0, 800, seed=4)
    t_sim = cal.fit_temperature(sim_z, sim_y)
    fit = cal.fit_real_temperature(sim_f, cal.RealCells(real_f, real_z, real_a), t_sim)
    assert fit is not None and fit.temperature == pytest.approx(t_sim)


def test_partial_label_nll_scores_the_group() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.2]]))
    group = np.array([[True, True, False]])
    assert cal.partial_label_nll(logits, group, np.ones(1)) == pytest.approx(-np.log(0.8))
