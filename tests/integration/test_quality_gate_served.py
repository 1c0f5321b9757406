"""Field quality gating end to end through Triton: the ensemble returns
FIELD_QUALITY and the client leaves a blurred field out of the patient's counts, naming it
in ``excluded_images``; with the gate off the same field counts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from marrowdx import config, taxonomy
from marrowdx.client import MarrowClient
from marrowdx.client.quality import NO_GATING
from marrowdx.contract import QUALITY_FIELDS

pytestmark = pytest.mark.server


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sharp_and_blurred() -> list[bytes]:
    from marrowdx.simulate import field as fl

    rng = np.random.default_rng(16)
    labels = [taxonomy.CLASSES[i] for i in rng.integers(0, taxonomy.N_CLASSES, 30)]
    sharp = fl.render_field(labels, config.FIELD_SIZE, fl.SlideStyle.draw(rng), rng).image
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(8)))
    return [_jpeg(sharp), _jpeg(blurred)]


def test_served_pipeline_excludes_a_blurred_field(triton_server, sharp_and_blurred) -> None:
    names = ["sharp.jpg", "blurred.jpg"]
    with MarrowClient(triton_server.grpc_url, target_cells=0) as client:
        report = client.diagnose_patient("P1", sharp_and_blurred, names=names)
    assert list(report.excluded_images) == ["blurred.jpg"]
    assert report.excluded_images["blurred.jpg"].startswith("out of focus")
    assert report.n_images == 1 and [im.file for im in report.images] == ["sharp.jpg"]
    assert set(report.images[0].quality) == set(QUALITY_FIELDS)
    assert report.to_dict()["excluded_images"] == report.excluded_images
    with MarrowClient(triton_server.grpc_url, target_cells=0, quality=NO_GATING) as client:
        counted = client.diagnose_patient("P1", sharp_and_blurred[1:], names=names[1:])
    assert counted.n_images == 1 and not counted.excluded_images
