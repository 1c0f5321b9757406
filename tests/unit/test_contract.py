"""The typed tensor contract (marrowdx.contract) and the Triton configs read through
protobuf against it (marrowdx.serving.model_config): every config follows it, a config that
does not is refused with a message naming file, model, tensor and field, the io blocks can be
rewritten from it (comments kept), and the code that sends or exports tensors reads it."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from marrowdx import config, contract
from marrowdx.errors import RepositoryError
from marrowdx.serving import contract_cli, repository
from marrowdx.serving import model_config as configs

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
    configs.check_repository(repository.source_repository())  # raises with every problem


def test_a_config_rendered_from_the_table_round_trips_through_text_format() -> None:
    for name in contract.MODELS:
        for target in contract.TARGETS:
            blocks = configs.render_io(name, target)
            text = f'name: "{name}"\n' + "\n".join(blocks.values()) + "\n"
            parsed = text_format.Parse(text, mc.ModelConfig())
            assert parsed == configs.table_config(name, target), f"{name} {target}"
            printed = text_format.MessageToString(parsed)
            assert text_format.Parse(printed, mc.ModelConfig()) == parsed
            inputs, outputs = contract.model(name).config_io(target)
            assert configs.config_tensors(parsed.input) == inputs
            assert configs.config_tensors(parsed.output) == outputs
            if not contract.model(name).steps:  # an ensemble needs its steps too
                assert configs.check_config(text, name, target) == [], f"{name} {target}"


def test_a_config_with_wrong_dims_or_dtype_is_reported_by_model_and_tensor() -> None:
    cfg = configs.table_config(M.diagnosis, "cpu")
    cfg.input[2].dims[0] += 1
    cfg.output[0].data_type = mc.TYPE_FP16
    problems = configs.check_config(text_format.MessageToString(cfg), M.diagnosis, "cpu", "here")
    assert problems == [
        f"here: diagnosis input {T.lab_values}: dims is [{config.N_LAB_VALUES + 1}], "
        f"the contract says [{config.N_LAB_VALUES}]",
        f"here: diagnosis output {T.diagnosis_probs}: data_type is TYPE_FP16, "
        "the contract says TYPE_FP32",
    ]


def test_settings_the_table_does_not_own_and_text_triton_refuses_are_reported() -> None:
    cfg = configs.table_config(M.detector, "cpu")
    cfg.input[0].reshape.shape.extend([1, 2])
    text = text_format.MessageToString(cfg)
    assert configs.check_config(text, M.detector, "cpu", "here") == [
        f"here: detector input {T.pixels}: sets reshape, which the contract does not "
        "(a write drops it)"
    ]
    (problem,) = configs.check_config(text + "\nmax_batch_sise: 4\n", M.detector, "cpu", "here")
    assert problem.startswith("here: cannot read it: line ") and "max_batch_sise" in problem
    # text_format prints one `output { ... }` per tensor: a rewrite wants the one `output [`
    with pytest.raises(configs.ConfigTextError, match="one top-level output block .* found 3"):
        configs.rewrite_config(text, M.detector, "cpu")


def test_a_wrong_config_is_refused_naming_file_model_tensor_and_field(source_copy: Path) -> None:
    gpu_classifier = source_copy / M.classifier / contract.GPU_CONFIG
    edit(
        gpu_classifier,
        'name: "CLASS_PROBS" data_type: TYPE_FP32 dims: [256, 33]',
        'name: "CLASS_PROBS" data_type: TYPE_FP32 dims: [256, 32]',
    )
    cpu_detector = source_copy / M.detector / "config.pbtxt"
    edit(cpu_detector, 'name: "SCORES" data_type: TYPE_FP32', 'name: "SCORES" data_type: TYPE_FP16')
    with pytest.raises(configs.ContractError) as caught:
        configs.check_repository(source_copy)
    err = caught.value
    assert isinstance(err, RepositoryError), "the CLI reports it like any repository problem"
    assert err.problems == [
        f"{cpu_detector}: detector output SCORES: data_type is TYPE_FP16, "
        "the contract says TYPE_FP32",
        f"{gpu_classifier}: classifier output CLASS_PROBS: dims is [256, 32], "
        "the contract says [256, 33]",
    ]
    assert f"{configs.CLI} write" in str(err)
    # each target is checked on its own: the cpu one still has only the detector's problem
    with pytest.raises(configs.ContractError) as cpu_only:
        configs.check_repository(source_copy, ("cpu",))
    assert [p.split(":")[0] for p in cpu_only.value.problems] == [str(cpu_detector)]


def test_missing_reordered_unrouted_and_unreadable_configs_are_named(source_copy: Path) -> None:
    pre = source_copy / M.preprocess / "config.pbtxt"
    edit(pre, '{ name: "LETTERBOX" data_type: TYPE_FP32 dims: [4] },\n', "")
    edit(pre, "allow_ragged_batch: true", "")
    pipe = source_copy / M.pipeline / "config.pbtxt"
    edit(pipe, 'output_map { key: "IMAGE_SIZE" value: "IMAGE_SIZE" }', "")
    (source_copy / M.diagnosis / contract.GPU_CONFIG).unlink()
    det_gpu = source_copy / M.detector / contract.GPU_CONFIG
    det_gpu.write_text(det_gpu.read_text() + "\noutput [ { name: }\n")
    with pytest.raises(configs.ContractError) as caught:
        configs.check_repository(source_copy)
    text = "\n".join(caught.value.problems)
    assert (
        f"{pre}: preprocess outputs are ['PIXELS', 'IMAGE_SIZE', 'FIELD_QUALITY'], the contract"
        in text
    )
    assert f"{pre}: preprocess input IMAGE: allow_ragged_batch is False" in text
    assert f"{pipe}: ensemble outputs ['IMAGE_SIZE'] are not routed" in text
    assert f"{source_copy / M.diagnosis / contract.GPU_CONFIG}: missing (gpu config" in text
    assert re.search(rf"{re.escape(str(det_gpu))}: cannot read it: line \d+, column \d+", text)


def test_build_refuses_a_disagreeing_config_before_writing(
    source_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit(source_copy / M.diagnosis / "config.pbtxt", "dims: [3]", "dims: [2]")
    monkeypatch.setattr(repository, "source_repository", lambda: source_copy)
    out = tmp_path / "out"
    with pytest.raises(configs.ContractError, match="diagnosis output DIAGNOSIS_PROBS: dims"):
        repository.build_repository(out, "cpu", onnx_dir=tmp_path / "no-onnx")
    assert not out.exists(), "nothing is written (or trained) for a wrong repository"


# ------------------------------------------------------------------------- rewriting
def test_write_restores_the_io_blocks_and_keeps_every_other_line(source_copy: Path) -> None:
    path = source_copy / M.classifier / contract.GPU_CONFIG
    original = path.read_text()
    edit(
        path,
        'name: "BOXES" data_type: TYPE_FP32 dims: [256, 4]',
        'name: "BOXES" data_type: TYPE_INT32 dims: [4]',
    )
    changed = configs.write_repository(source_copy)
    assert path in changed
    configs.check_repository(source_copy)
    rewritten = path.read_text()
    assert rewritten == configs.rewrite_config(original, M.classifier, "gpu")
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert comments and all(line in rewritten.splitlines() for line in comments)
    assert configs.write_repository(source_copy) == [], "a second write changes nothing"


def test_serving_a_dynamic_axis_on_one_target_is_one_change(
    source_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How the gpu classifier's box axis becomes -1: add the target to dynamic_on, write."""
    dynamic = dataclasses.replace(contract.CLASSIFIER, dynamic_on=frozenset({"gpu"}))
    monkeypatch.setitem(contract.MODELS, M.classifier, dynamic)
    gpu = source_copy / M.classifier / contract.GPU_CONFIG
    assert any(
        "dims is [256, 4], the contract says [-1, 4]" in p
        for p in configs.check_config(gpu.read_text(), M.classifier, "gpu")
    )
    assert configs.write_repository(source_copy) == [gpu], "only the gpu classifier changes"
    configs.check_repository(source_copy)
    parsed = configs.load_config(gpu)
    dims = {t.name: tuple(t.dims) for t in [*parsed.input, *parsed.output]}
    assert dims[T.boxes] == (-1, 4) and dims[T.class_probs] == (-1, config.N_CLASSES)
    assert dims[T.class_counts] == (config.N_CLASSES,), "per-image outputs keep their size"


def test_cli_check_write_and_models(source_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert contract_cli.main(["models", "--exported"]) == 0
    assert capsys.readouterr().out.split() == list(contract.EXPORTED_MODELS)
    edit(source_copy / M.detector / "config.pbtxt", "dims: [256]", "dims: [128]")
    assert contract_cli.main(["check", "--repository", str(source_copy)]) == 2
    assert "detector output SCORES: dims is [128]" in capsys.readouterr().err
    assert contract_cli.main(["write", "--repository", str(source_copy)]) == 0
    assert "every config follows the tensor contract" in capsys.readouterr().out


def test_model_repository_readme_shows_the_table() -> None:
    text = README.read_text()
    found = re.search(
        r"<!-- contract table: start -->\n(.*?)\n<!-- contract table: end -->", text, flags=re.S
    )
    assert found, "model_repository/README.md lost its contract table markers"
    assert found.group(1) == contract_cli.markdown_table(), (
        f"run `{configs.CLI} table` and paste it into model_repository/README.md"
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
