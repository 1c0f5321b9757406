"""The typed tensor contract (marrowdx.contract): every Triton config follows it, a config
that does not is refused with a message naming file, model, tensor and field, the io blocks
can be rewritten from it, and the code that sends or exports tensors reads it."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from marrowdx import config, contract
from marrowdx.errors import RepositoryError
from marrowdx.serving import repository

T, M = config.TENSORS, config.MODELS
README = config.project_root() / "model_repository" / "README.md"


def config_files(repo: Path) -> list[tuple[str, str, Path]]:
    """(model, target, path) of every config a source repository holds."""
    return [
        (name, target, repo / name / spec.config_path(target))
        for name, spec in contract.MODELS.items()
        for target in contract.TARGETS
    ]


@pytest.fixture
def source_copy(tmp_path: Path) -> Path:
    """The source configs in a scratch folder, to break them without touching the checkout."""
    out = tmp_path / "model_repository"
    for name, _target, path in config_files(repository.source_repository()):
        dst = out / name / path.relative_to(repository.source_repository() / name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
    return out


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: {old!r} not found once"
    path.write_text(text.replace(old, new))


# ------------------------------------------------------------------ the table itself
def test_table_builds_on_the_configured_names_and_sizes() -> None:
    assert contract.EXPORTED_MODELS == (M.detector, M.classifier, M.diagnosis)
    assert set(contract.MODELS) == {getattr(M, f.name) for f in dataclasses.fields(M)}
    named = {t.name for m in contract.MODELS.values() for t in m.inputs + m.outputs}
    assert named == {getattr(T, f.name) for f in dataclasses.fields(T)}, "every name is served"
    assert contract.CLASSIFIER.outputs[0].dims == (config.MAX_DETECTIONS, config.N_CLASSES)
    assert contract.PIXELS.dims == (3, config.INPUT_SIZE, config.INPUT_SIZE)
    assert contract.DIAGNOSIS_PROBS.dims == (config.N_DIAGNOSES,)
    # one definition per tensor: a name used by several models is the same spec (up to the
    # classifier graph's dynamic box axis)
    seen: dict[str, contract.TensorSpec] = {}
    for m in contract.MODELS.values():
        for t in m.inputs + m.outputs:
            first = seen.setdefault(t.name, t)
            assert dataclasses.replace(t, dynamic_axes=()) == dataclasses.replace(
                first, dynamic_axes=()
            ), t.name


def test_dims_per_target_and_in_the_onnx_graph() -> None:
    boxes = contract.CLASSIFIER.inputs[1]
    assert boxes.name == T.boxes
    assert boxes.config_dims(dynamic=False) == (config.MAX_DETECTIONS, 4)
    assert boxes.config_dims(dynamic=True) == (contract.VARIABLE, 4)
    assert boxes.onnx_dims() == (contract.BATCH_DIM, contract.BOX_DIM, 4)
    assert contract.DETECTOR.outputs[0].onnx_dims() == (
        contract.BATCH_DIM,
        config.MAX_DETECTIONS,
        4,
    ), "the detector's BOXES are fixed: only the classifier's graph cuts the box axis"
    assert contract.CLASSIFIER.config_path("gpu") == contract.GPU_CONFIG
    assert contract.PIPELINE.config_path("gpu") == contract.CPU_CONFIG  # one ensemble config
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        contract.CLASSIFIER.config_io("tpu")
    with pytest.raises(ValueError, match="unknown model 'segmenter'"):
        contract.model("segmenter")


# ------------------------------------------------------------- configs against it
def test_every_source_config_follows_the_contract() -> None:
    contract.check_repository(repository.source_repository())  # raises with every problem


def test_the_stdlib_reader_reads_configs_as_protobuf_does() -> None:
    """The check must see what Triton sees; Triton parses configs with protobuf."""
    pb = pytest.importorskip(
        "tests.helpers.model_configs", reason="protobuf comes with the [client] extra"
    )

    for name, target, path in config_files(repository.source_repository()):
        text = path.read_text()
        ours = contract.parse_pbtxt(text)
        theirs = pb.load_config(path)
        assert ours["name"] == [theirs.name]
        assert ours["max_batch_size"] == [theirs.max_batch_size], path
        for kind, entries in (("input", theirs.input), ("output", theirs.output)):
            want = pb.io_tensors(entries)
            assert contract.config_tensors(ours.get(kind, [])) == want, f"{path} {kind}"
        steps = ours.get("ensemble_scheduling", [{}])[0].get("step", [])
        assert [s["model_name"][0] for s in steps] == [
            s.model_name for s in theirs.ensemble_scheduling.step
        ], f"{name} {target}"


def test_a_wrong_config_is_refused_naming_file_model_tensor_and_field(source_copy: Path) -> None:
    gpu_classifier = source_copy / M.classifier / contract.GPU_CONFIG
    edit(
        gpu_classifier,
        'name: "CLASS_PROBS" data_type: TYPE_FP32 dims: [ 256, 33 ]',
        'name: "CLASS_PROBS" data_type: TYPE_FP32 dims: [ 256, 32 ]',
    )
    cpu_detector = source_copy / M.detector / "config.pbtxt"
    edit(cpu_detector, 'name: "SCORES" data_type: TYPE_FP32', 'name: "SCORES" data_type: TYPE_FP16')
    with pytest.raises(contract.ContractError) as caught:
        contract.check_repository(source_copy)
    err = caught.value
    assert isinstance(err, RepositoryError), "the CLI reports it like any repository problem"
    assert err.problems == [
        f"{cpu_detector}: detector output SCORES: data_type is TYPE_FP16, "
        "the contract says TYPE_FP32",
        f"{gpu_classifier}: classifier output CLASS_PROBS: dims is [256, 32], "
        "the contract says [256, 33]",
    ]
    assert "python -m marrowdx.contract write" in str(err)
    # each target is checked on its own: the cpu one still has only the detector's problem
    with pytest.raises(contract.ContractError) as cpu_only:
        contract.check_repository(source_copy, ("cpu",))
    assert [p.split(":")[0] for p in cpu_only.value.problems] == [str(cpu_detector)]


def test_missing_reordered_unrouted_and_unreadable_configs_are_named(source_copy: Path) -> None:
    pre = source_copy / M.preprocess / "config.pbtxt"
    edit(pre, '{ name: "LETTERBOX" data_type: TYPE_FP32 dims: [ 4 ] },\n', "")
    edit(pre, "allow_ragged_batch: true", "")
    pipe = source_copy / M.pipeline / "config.pbtxt"
    edit(pipe, 'output_map { key: "IMAGE_SIZE" value: "IMAGE_SIZE" }', "")
    (source_copy / M.diagnosis / contract.GPU_CONFIG).unlink()
    det_gpu = source_copy / M.detector / contract.GPU_CONFIG
    det_gpu.write_text(det_gpu.read_text() + "\noutput [ { name: }\n")
    with pytest.raises(contract.ContractError) as caught:
        contract.check_repository(source_copy)
    text = "\n".join(caught.value.problems)
    assert (
        f"{pre}: preprocess outputs are ['PIXELS', 'IMAGE_SIZE', 'FIELD_QUALITY'], the contract"
        in text
    )
    assert f"{pre}: preprocess input IMAGE: allow_ragged_batch is False" in text
    assert f"{pipe}: ensemble outputs ['IMAGE_SIZE'] are not routed" in text
    assert f"{source_copy / M.diagnosis / contract.GPU_CONFIG}: missing (gpu config" in text
    assert re.search(rf"{re.escape(str(det_gpu))}: cannot read it: line \d+", text)


def test_build_refuses_a_disagreeing_config_before_writing(
    source_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit(source_copy / M.diagnosis / "config.pbtxt", "dims: [ 3 ]", "dims: [ 2 ]")
    monkeypatch.setattr(repository, "source_repository", lambda: source_copy)
    out = tmp_path / "out"
    with pytest.raises(contract.ContractError, match="diagnosis output DIAGNOSIS_PROBS: dims"):
        repository.build_repository(out, "cpu", onnx_dir=tmp_path / "no-onnx")
    assert not out.exists(), "nothing is written (or trained) for a wrong repository"


# ------------------------------------------------------------------------- rewriting
def test_write_restores_the_io_blocks_and_keeps_every_other_line(source_copy: Path) -> None:
    path = source_copy / M.classifier / contract.GPU_CONFIG
    original = path.read_text()
    edit(
        path,
        'name: "BOXES" data_type: TYPE_FP32 dims: [ 256, 4 ]',
        'name: "BOXES" data_type: TYPE_INT32 dims: [ 4 ]',
    )
    changed = contract.write_repository(source_copy)
    assert path in changed
    contract.check_repository(source_copy)
    rewritten = path.read_text()
    assert rewritten == contract.rewrite_config(original, M.classifier, "gpu")
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert comments and all(line in rewritten.splitlines() for line in comments)
    assert contract.write_repository(source_copy) == [], "a second write changes nothing"


def test_serving_a_dynamic_axis_on_one_target_is_one_change(
    source_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How the gpu classifier's box axis becomes -1: add the target to dynamic_on, write."""
    dynamic = dataclasses.replace(contract.CLASSIFIER, dynamic_on=frozenset({"gpu"}))
    monkeypatch.setitem(contract.MODELS, M.classifier, dynamic)
    gpu = source_copy / M.classifier / contract.GPU_CONFIG
    assert any(
        "dims is [256, 4], the contract says [-1, 4]" in p
        for p in contract.check_config(gpu.read_text(), M.classifier, "gpu")
    )
    assert contract.write_repository(source_copy) == [gpu], "only the gpu classifier changes"
    contract.check_repository(source_copy)
    parsed = contract.parse_pbtxt(gpu.read_text())
    dims = {t.name: t.dims for t in contract.config_tensors(parsed["input"] + parsed["output"])}
    assert dims[T.boxes] == (-1, 4) and dims[T.class_probs] == (-1, config.N_CLASSES)
    assert dims[T.class_counts] == (config.N_CLASSES,), "per-image outputs keep their size"


def test_cli_check_write_and_models(source_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert contract.main(["models", "--exported"]) == 0
    assert capsys.readouterr().out.split() == list(contract.EXPORTED_MODELS)
    edit(source_copy / M.detector / "config.pbtxt", "dims: [ 256 ]", "dims: [ 128 ]")
    assert contract.main(["check", "--repository", str(source_copy)]) == 2
    assert "detector output SCORES: dims is [128]" in capsys.readouterr().err
    assert contract.main(["write", "--repository", str(source_copy)]) == 0
    assert "every config follows the tensor contract" in capsys.readouterr().out


def test_model_repository_readme_shows_the_table() -> None:
    text = README.read_text()
    found = re.search(
        r"<!-- contract table: start -->\n(.*?)\n<!-- contract table: end -->", text, flags=re.S
    )
    assert found, "model_repository/README.md lost its contract table markers"
    assert found.group(1) == contract.markdown_table(), (
        "run `python -m marrowdx.contract table` and paste it into model_repository/README.md"
    )


# --------------------------------------------------------------------------- readers
def test_client_and_in_process_pipeline_read_the_contract() -> None:
    pytest.importorskip("tritonclient.grpc", reason="the client needs the [client] extra")
    from marrowdx.client import transport

    from marrowdx.serving import inprocess

    assert transport.PIPELINE_OUTPUTS is contract.PIPELINE_OUTPUTS
    assert inprocess.PIPELINE_OUTPUTS is contract.PIPELINE_OUTPUTS
    (image,) = transport.image_inputs(b"\xff\xd8 not really a jpeg")
    assert (image.name(), image.datatype(), image.shape()) == (T.image, "UINT8", [1, 20])
    sent = transport.diagnosis_infer_inputs(
        np.full(config.N_CLASSES, 1 / config.N_CLASSES), 120, np.zeros(4), np.zeros(4)
    )
    assert [(t.name(), t.datatype(), t.shape()) for t in sent] == [
        (s.name, s.dtype.wire, [1, *s.dims]) for s in contract.DIAGNOSIS.inputs
    ]


def test_onnx_export_reads_the_contract() -> None:
    pytest.importorskip("torch", reason="ONNX export needs the [export] extra")
    from marrowdx.export import onnx_export

    assert onnx_export.IO_NAMES == {m: contract.io_names(m) for m in contract.EXPORTED_MODELS}
    per_box = {T.boxes, T.class_probs, T.attribute_probs, T.familiarity}
    assert onnx_export.BOX_AXIS_TENSORS == per_box
    axes = onnx_export._dynamic_axes(M.classifier)
    assert axes[T.boxes] == {0: contract.BATCH_DIM, 1: contract.BOX_DIM}
    assert axes[T.class_counts] == {0: contract.BATCH_DIM}
