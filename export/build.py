"""``build_onnx_models``: simulate (if needed) -> train (if stale) -> calibrate (if not yet)
-> export (if older) -> verify.

The one entry point ``marrowdx build`` and the test fixtures use. Every step is skipped
when its output is current, so a second call costs a few file stats; a file lock keeps two
processes (say, two test sessions) from training the same preset at once.
"""

from __future__ import annotations

import fcntl
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from marrowdx import config, contract
from marrowdx.serving.onnx_artifacts import OnnxModels
from marrowdx.simulate.cohort import RENDERER_VERSION

#: The models trained here and exported to ONNX, in build order.
KINDS = contract.EXPORTED_MODELS
#: Processes rendering the training cohort (the simulator's output is identical for any count).
SIMULATION_WORKERS = 2
#: Bump when model code changes in a way that invalidates trained weights (7: the detector's
#: simulated and real losses are normalised separately; a calibration slice of the real
#: images is held out of training).
MODEL_CODE_VERSION = 7
#: The reference weights shipped inside the package (``marrowdx.models``), with their card.
SHIPPED_PRESET = "reference"
#: Written beside weights installed from the package: the shipped files' digests. Why: an
#: updated checkout ships new weights under the same preset fingerprint, and a build that
#: kept the ones it installed earlier would serve them silently; weights trained here have
#: no marker and are kept.
SHIPPED_MARKER = "shipped.json"


@dataclass(frozen=True)
class BuildLayout:
    """Where one preset's artefacts live under the work dir."""

    work_dir: Path
    preset: str

    @property
    def weights_dir(self) -> Path:
        return self.work_dir / "models" / self.preset

    @property
    def onnx_dir(self) -> Path:
        return self.work_dir / "onnx" / self.preset

    @property
    def cache_dir(self) -> Path:
        return self.work_dir / "cache"

    def checkpoint(self, kind: str) -> Path:
        return self.weights_dir / f"{kind}.pt"

    def onnx(self, kind: str) -> Path:
        return self.onnx_dir / f"{kind}.onnx"

    def training_cohort(self, seed: int) -> Path:
        return self.work_dir / "cohorts" / f"train-{self.preset}-seed{seed}-r{RENDERER_VERSION}"

    def held_out_cohort(self, seed: int) -> Path:
        """The cohort the preset's probabilities are calibrated on (never trained on)."""
        return self.work_dir / "cohorts" / f"heldout-{self.preset}-seed{seed}-r{RENDERER_VERSION}"


class Progress:
    """Timestamped progress lines on stderr (or nothing)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(
                f"[marrowdx models {time.monotonic() - self.started:6.1f}s] {message}",
                file=sys.stderr,
                flush=True,
            )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stamp(preset) -> str:
    return f"{preset.fingerprint()}-code{MODEL_CODE_VERSION}-render{RENDERER_VERSION}"


#: What identifies the real images a checkpoint was trained on (``RealData.description``):
#: the same sets with the same training files at the same spacing give the same weights,
#: wherever the folders are (a spacing given over the declarations resamples every image;
#: None, the declared one, is also what checkpoints from before the key say).
REAL_DATA_KEYS = ("sets", "fields", "crops", "cells_in_fields", "files_sha", "um_per_pixel_given")


def same_real_data(metadata: dict | None, real_description: dict) -> bool:
    """True when a checkpoint was trained on exactly the real training images described."""
    trained = ((metadata or {}).get("training_data") or {}).get("real_data") or {}
    return all(trained.get(k) == real_description.get(k) for k in REAL_DATA_KEYS)


def weights_current(
    layout: BuildLayout,
    preset,
    cohort_key: str | None = None,
    real_description: dict | None = None,
) -> bool:
    """True when all three checkpoints exist and were trained by this preset (and cohort, and
    with ``real_description`` on those real images)."""
    from marrowdx.models.checkpoints import CHECKPOINT_FORMAT, read_metadata

    for kind in KINDS:
        meta = read_metadata(layout.checkpoint(kind))
        if not meta or meta.get("preset_fingerprint") != _stamp(preset):
            return False
        if meta.get("checkpoint_format") != CHECKPOINT_FORMAT:
            return False
        if cohort_key and meta.get("training_data", {}).get("ground_truth_sha") != cohort_key:
            return False
        if real_description is not None and not same_real_data(meta, real_description):
            return False
    return True


def ensure_training_cohort(layout: BuildLayout, preset, log: Progress) -> Path:
    """Simulate the preset's training cohort once (fixed seed) and return its folder."""
    out = layout.training_cohort(preset.seed)
    return simulate_once(
        out, preset.train_patients, preset.images_per_patient, preset.seed, log, "training"
    )


def simulate_once(
    out: Path, patients: int, images_per_patient: int, seed: int, log: Progress, role: str
) -> Path:
    """Simulate a cohort into ``out`` unless it is already there (written atomically)."""
    from marrowdx.simulate import simulate_cohort

    if (out / "ground_truth.json").exists():
        return out
    log(f"simulating {role} cohort: {patients} patients x {images_per_patient} images -> {out}")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    simulate_cohort(
        tmp,
        patients,
        seed,
        images_per_patient=images_per_patient,
        size=config.FIELD_SIZE,
        progress=log.enabled,
        workers=SIMULATION_WORKERS,
    )
    tmp.replace(out)
    return out


def shipped_weights_dir() -> Path:
    """Where the package keeps the reference weights (``marrowdx.models``' ``weights/``)."""
    from marrowdx.models import checkpoints

    return Path(checkpoints.__file__).resolve().parent / "weights" / SHIPPED_PRESET


def install_shipped_weights(
    layout: BuildLayout, preset, log: Progress, real_description: dict | None = None
) -> bool:
    """Copy the shipped reference weights into the build when they were trained by this
    code and preset (so a fresh clone serves them without training), and with
    ``real_description`` on those real images (so ``--data`` with the sets they were trained
    on recalibrates them instead of training for most of an hour); False otherwise."""
    import shutil

    source_dir = shipped_weights_dir()
    if preset.name != SHIPPED_PRESET or not all(
        (source_dir / f"{kind}.pt").exists() for kind in KINDS
    ):
        return False
    from marrowdx.models.checkpoints import read_metadata

    metadata = {kind: read_metadata(source_dir / f"{kind}.pt") for kind in KINDS}
    stamps = {meta.get("preset_fingerprint") for meta in metadata.values()}
    if stamps != {_stamp(preset)}:
        log(f"shipped weights in {source_dir} are from other code ({stamps}); not used")
        return False
    if real_description is not None and not same_real_data(
        metadata["classifier"], real_description
    ):
        return False
    layout.weights_dir.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        shutil.copy2(source_dir / f"{kind}.pt", layout.checkpoint(kind))
    marker = layout.weights_dir / SHIPPED_MARKER
    marker.write_text(json.dumps(shipped_digests(source_dir), indent=1, sort_keys=True) + "\n")
    log(f"installed the shipped reference weights from {source_dir} (see docs/model_card.md)")
    return True


def shipped_digests(source_dir: Path | None = None) -> dict[str, str]:
    """sha256 of each shipped weights file (``SHIPPED_MARKER``'s content)."""
    from marrowdx.serving.repository import file_digest

    source_dir = source_dir or shipped_weights_dir()
    return {kind: file_digest(source_dir / f"{kind}.pt") for kind in KINDS}


def installed_weights_outdated(layout: BuildLayout) -> bool:
    """True when the build's weights were installed from the package and the package now
    ships others (an updated checkout or install); False for weights trained here."""
    marker = layout.weights_dir / SHIPPED_MARKER
    if layout.preset != SHIPPED_PRESET or not marker.exists():
        return False
    try:
        installed = json.loads(marker.read_text())
        return installed != shipped_digests()
    except (OSError, ValueError):
        return True


def repository_staleness(repository: Path, work_dir: Path | None = None) -> list[str]:
    """Why a built model repository no longer serves what ``marrowdx build`` would put there
    (empty when it does): a model whose ONNX file differs from the build's last export of its
    preset, or reference weights installed before the package shipped others. Cheap (file
    digests and ONNX metadata, no torch), so ``marrowdx serve`` asks it every start."""
    from marrowdx.serving.onnx_artifacts import read_onnx_metadata
    from marrowdx.serving.onnx_runner import ONNX_FILENAME
    from marrowdx.serving.repository import file_digest

    work_dir = Path(work_dir or config.default_work_dir())
    reasons, presets = [], set()
    for kind in KINDS:
        served = Path(repository) / kind / "1" / ONNX_FILENAME
        if not served.exists():
            continue
        try:
            preset = read_onnx_metadata(served).get("preset")
        except (OSError, ValueError, KeyError):
            continue  # not one of ours: nothing to compare with
        if not preset:
            continue
        presets.add(preset)
        exported = BuildLayout(work_dir, preset).onnx(kind)
        if exported.exists() and file_digest(exported) != file_digest(served):
            reasons.append(f"{kind}/1/{ONNX_FILENAME} differs from the last export ({exported})")
    for preset in sorted(presets):
        layout = BuildLayout(work_dir, preset)
        if installed_weights_outdated(layout):
            reasons.append(
                f"the {preset} weights in {layout.weights_dir} were installed from an "
                "earlier version of the package, which now ships others"
            )
    return reasons


def train_models(layout: BuildLayout, preset, cohort_dir: Path, log: Progress, real=None) -> None:
    """Train all three models on a cohort (plus real images when given: a
    ``training.real_data.RealData``) and save their checkpoints."""
    from marrowdx.models.checkpoints import checkpoint_metadata, save_checkpoint
    from marrowdx.training import train
    from marrowdx.training.data import prepare_cohort

    log(f"preparing {cohort_dir}")
    data = prepare_cohort(cohort_dir, layout.cache_dir, log=log)
    description = {
        **data.description,
        "source": "marrowdx.simulate" if cohort_dir.name.startswith("train-") else str(cohort_dir),
        "real_data": real.description if real is not None else None,
    }
    log(
        "training on {images} images, {cells} cells, {patients} patients".format(**data.description)
    )
    t0 = time.monotonic()
    detector = train.train_detector(data, preset, log, real)
    log(f"detector trained in {time.monotonic() - t0:.0f}s")
    t0 = time.monotonic()
    classifier = train.train_classifier(data, preset, log, real)
    log(f"classifier trained in {time.monotonic() - t0:.0f}s")
    t0 = time.monotonic()
    confusion = train.classifier_confusion(classifier, data)
    diagnosis = train.train_diagnosis(confusion, preset, log)
    log(f"diagnosis model trained in {time.monotonic() - t0:.0f}s")
    for kind, model in zip(KINDS, (detector, classifier, diagnosis), strict=True):
        meta = checkpoint_metadata(kind, preset.name, _stamp(preset), description)
        save_checkpoint(layout.checkpoint(kind), kind, model, meta)
    (layout.weights_dir / SHIPPED_MARKER).unlink(missing_ok=True)  # trained here, not installed
    log(f"weights saved under {layout.weights_dir}")


#: The models whose probabilities are temperature-scaled (the detector's scores are not
#: probabilities anyone reads as such: they only pass a threshold).
CALIBRATED_KINDS = ("classifier", "diagnosis")


def calibration_current(layout: BuildLayout) -> bool:
    """True when every calibrated model's checkpoint carries this code's calibration."""
    from marrowdx.models.checkpoints import read_metadata
    from marrowdx.training.calibration import is_calibrated

    return all(is_calibrated(read_metadata(layout.checkpoint(k))) for k in CALIBRATED_KINDS)


def real_sets_trained_on(metadata: dict | None) -> list[str]:
    """The real data sets a checkpoint was trained on (its ``training_data``), else []."""
    real = ((metadata or {}).get("training_data") or {}).get("real_data") or {}
    return list(real.get("sets") or []) if (real.get("crops") or real.get("fields")) else []


def calibrate_checkpoints(layout: BuildLayout, preset, log: Progress, real=None) -> None:
    """Fit temperatures on the preset's held-out cohort and save them into the checkpoints
    (buffers + ``calibration`` metadata), without retraining: existing weights are
    calibrated in place, and the newer checkpoints make the export step run again. ``real``
    (``training.real_data.RealData``): real cells held out of training (the calibration
    slice) the familiarity score is also fitted on.

    Weights trained on real images are not recalibrated when no real images are given:
    fitted on simulated cells alone, the familiarity limit calls nearly every real cell
    unfamiliar (docs/unfamiliar_cells.md), and nothing else would show it; a slice left
    empty by a small data set is said in the log."""
    from marrowdx.models.checkpoints import load_checkpoint, read_metadata, save_checkpoint
    from marrowdx.training.calibration import (
        METADATA_KEY,
        calibrate_models,
        held_out_settings,
        real_cell_features,
    )
    from marrowdx.training.data import prepare_cohort

    trained_on = real_sets_trained_on(read_metadata(layout.checkpoint("classifier")))
    if trained_on and real is None:
        raise RuntimeError(
            f"the weights in {layout.weights_dir} were trained on real images "
            f"({', '.join(trained_on)}) and their calibration is stale; recalibrating them "
            "needs those sets' held-out calibration slice, or the familiarity limit and the "
            "real-cell temperature would be fitted on simulated cells alone: run `marrowdx "
            f"build --preset {preset.name} --data DIR ...` with the same folders, which "
            "recalibrates them without retraining (docs/model_card.md)"
        )
    if trained_on and real.empty:
        log(
            f"warning: the calibration slice of {', '.join(trained_on)} is empty (too few "
            "images): the familiarity limit is fitted on simulated cells alone and may call "
            "real cells unfamiliar"
        )
    settings = held_out_settings(preset.name)
    seed = settings.seed(preset.seed)
    cohort_dir = simulate_once(
        layout.held_out_cohort(seed),
        settings.patients,
        settings.images_per_patient,
        seed,
        log,
        "held-out calibration",
    )
    data = prepare_cohort(cohort_dir, layout.cache_dir, log=log)
    ckpts = {kind: load_checkpoint(layout.checkpoint(kind)) for kind in KINDS}
    t0 = time.monotonic()
    real_cells = None
    if real is not None and not real.empty:
        real_cells = real_cell_features(
            ckpts["classifier"].model, real, seed=seed, detector=ckpts["detector"].model
        )
        log(f"familiarity and real-cell temperature: {len(real_cells)} held-out real cells")
    result = calibrate_models(
        ckpts["detector"].model,
        ckpts["classifier"].model,
        ckpts["diagnosis"].model,
        data,
        settings,
        seed,
        log,
        real_cells,
    )
    fitted = {"classifier": result.classifier_metadata(), "diagnosis": result.diagnosis_metadata()}
    for kind in CALIBRATED_KINDS:
        ckpt = ckpts[kind]
        meta = {**ckpt.metadata, METADATA_KEY: fitted[kind]}
        save_checkpoint(layout.checkpoint(kind), kind, ckpt.model, meta)
    log(f"calibrated on {cohort_dir.name} in {time.monotonic() - t0:.0f}s")


def export_models(layout: BuildLayout, log: Progress, *, force: bool = False) -> None:
    """Export every checkpoint whose ONNX file is missing, older or of an earlier export
    format, and verify it."""
    from marrowdx.export.onnx_export import (
        compare_with_torch,
        export_is_current,
        export_onnx,
        random_inputs,
    )
    from marrowdx.models.checkpoints import load_checkpoint

    for kind in KINDS:
        ckpt_path, onnx_path = layout.checkpoint(kind), layout.onnx(kind)
        if (
            not force
            and onnx_path.exists()
            and onnx_path.stat().st_mtime >= ckpt_path.stat().st_mtime
            and export_is_current(onnx_path)
        ):
            continue
        ckpt = load_checkpoint(ckpt_path)
        t0 = time.monotonic()
        export_onnx(ckpt.model, kind, onnx_path, ckpt.metadata)
        agreement = compare_with_torch(
            ckpt.model, kind, onnx_path, [random_inputs(kind, 2, seed=1)]
        )
        if not agreement.ok:
            onnx_path.unlink(missing_ok=True)
            raise RuntimeError(f"{kind}: ONNX Runtime disagrees with torch: {agreement.failures}")
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in agreement.max_abs.items())
        log(f"exported {onnx_path} ({time.monotonic() - t0:.1f}s; max |torch-onnx|: {diffs})")


def build_onnx_models(
    work_dir: Path | None = None,
    preset: str = "reference",
    *,
    cohort: Path | None = None,
    progress: bool = True,
    force_train: bool = False,
    real_data: tuple[Path, ...] = (),
    real_um_per_pixel: float | None = None,
) -> OnnxModels:
    """Train (only when weights are missing/stale), calibrate (only when the calibration is
    of an earlier version) and export (only when ONNX is older).

    ``cohort`` trains on an existing cohort folder (ground_truth.json); without it the
    preset's own cohort is simulated under ``work_dir`` with a fixed seed. ``real_data``:
    folders of real annotated images (``marrowdx.datasets``) trained on beside it
    (``real_um_per_pixel`` overrides their declared spacing); weights trained on exactly
    those images (the same training files) are current, and only recalibrated on the sets'
    calibration slice when their calibration is stale. The reference preset takes the
    shipped weights when they are current.
    """
    from marrowdx.serving.onnx_artifacts import read_onnx_metadata
    from marrowdx.training.data import ground_truth_key
    from marrowdx.training.presets import get_preset

    spec = get_preset(preset)
    layout = BuildLayout(Path(work_dir or config.default_work_dir()), spec.name)
    log = Progress(progress)
    with _locked(layout.work_dir / "locks" / f"{spec.name}.lock"):
        cohort_key = None
        if cohort is not None:
            from marrowdx.training.data import read_ground_truth

            cohort_key = ground_truth_key(read_ground_truth(Path(cohort)))
        real = real_calibration = None
        if real_data:
            from marrowdx.training.real_data import (
                load_sets,
                real_from_datasets,
                require_every_set,
            )

            sets = load_sets(real_data, layout.work_dir, log, um_per_pixel=real_um_per_pixel)
            real = real_from_datasets(sets, log=log)
            require_every_set(sets, {i.source for i in [*real.fields, *real.crops]}, ("train",))
            real.description["um_per_pixel_given"] = real_um_per_pixel
            real_calibration = real_from_datasets(sets, splits=("calibration",))
            log(
                f"calibration slice held out of training: {len(real_calibration.crops)} "
                f"crops, {len(real_calibration.fields)} fields"
            )
        real_description = None if real is None else real.description
        current = weights_current(layout, spec, cohort_key, real_description)
        installed = False
        if current and not force_train and installed_weights_outdated(layout):
            log("the package ships other reference weights than the ones installed here")
            installed = install_shipped_weights(layout, spec, log, real_description)
        if not (current or force_train or cohort is not None):
            current = installed = install_shipped_weights(layout, spec, log, real_description)
        if force_train or not current:
            cohort_dir = (
                Path(cohort) if cohort is not None else ensure_training_cohort(layout, spec, log)
            )
            if not real_data and (spec.cls_real_crops or spec.det_real_batch):
                log(
                    f"warning: preset {spec.name!r} also trains on real images, and none were "
                    "given (--data DIR; docs/model_card.md): training on simulated fields only"
                )
            train_models(layout, spec, cohort_dir, log, real)
        else:
            trained_on = " and these real images" if real is not None else ""
            log(f"weights for preset {spec.name!r}{trained_on} are current ({layout.weights_dir})")
        if not calibration_current(layout):
            calibrate_checkpoints(layout, spec, log, real_calibration)
        # installed files keep the package's modification times, which can be older than an
        # earlier export of other weights
        export_models(layout, log, force=installed)
    paths = {kind: layout.onnx(kind) for kind in KINDS}
    metadata = {kind: read_onnx_metadata(path) for kind, path in paths.items()}
    summary = dict(metadata["classifier"])
    summary["models"] = {kind: json.loads(json.dumps(m)) for kind, m in metadata.items()}
    return OnnxModels(**paths, metadata=summary)
