"""Deterministic image encoding: the same pixels always give the same bytes.

Why in the core: the simulator writes its fields with it and the slide reader encodes the
fields it cuts from a pyramid the same way, so a slide's fields reach the server as the
simulator's JPEG fields do.
"""

from __future__ import annotations

import io

import numpy as np

#: JPEG quality of encoded fields (the simulator's ``jpg`` format, slide fields).
JPEG_QUALITY = 92


def encode(image: np.ndarray, image_format: str) -> bytes:
    """Encode an RGB uint8 image deterministically (fixed quality and options) as JPEG or PNG."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(image, "RGB")
    if image_format in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False)
    elif image_format == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    return buf.getvalue()
