"""Triton configs read with protobuf, the parser Triton itself uses (tritonclient and
protobuf come with the [client] extra), in the tensor contract's terms."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from marrowdx import contract


def load_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def io_tensors(entries: Iterable) -> list[contract.ConfigTensor]:
    """A config's ``input`` or ``output`` entries as :class:`contract.ConfigTensor`."""
    return [
        contract.ConfigTensor(
            t.name,
            mc.DataType.Name(t.data_type),
            tuple(t.dims),
            getattr(t, "allow_ragged_batch", False),  # inputs only
        )
        for t in entries
    ]
