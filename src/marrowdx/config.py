"""Configuration in one place: model and tensor names, sizes, limits and default ports.

The names and sizes here are what ``marrowdx.contract`` builds the typed tensor contract
from (dtypes, shapes, per model); change them here and nowhere else. Import-light (stdlib
only) because the thin client imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from marrowdx import taxonomy

# ---------------------------------------------------------------------------- geometry
#: Side of the square, letterboxed detector/classifier input (pixels).
INPUT_SIZE = 512
#: Default simulated field of view (width, height).
FIELD_SIZE = (1024, 1024)
#: Pixel spacing (µm per pixel) the simulator renders fields at and the models are trained
#: at: red cells 28-36 px across are 7-9 µm. A slide at another spacing is resampled to it
#: before its fields are sent (``marrowdx.slides``).
MODEL_UM_PER_PIXEL = 0.25
#: Metadata key (checkpoint metadata and exported ONNX metadata_props) of the fitted
#: calibration: temperatures and the familiarity score.
CALIBRATION_METADATA_KEY = "calibration"
#: Red-cell diameter range (pixels at MODEL_UM_PER_PIXEL) the simulator draws: 7-9 µm, the
#: size the pixel-spacing estimator measures real red cells against.
RED_CELL_DIAMETER_PX = (28.0, 36.0)
#: Fixed maximum number of detections per image (top-K inside the detector graph).
MAX_DETECTIONS = 256
#: Side of the square crop the classifier takes around each detected cell (pixels). The
#: input is at 0.5 µm/px, so a 12-15 µm cell's window (box x 1.25) is 30-38 pixels: 32
#: samples keep its detail, where 64 only interpolated between the same pixels.
CROP_SIZE = 32
#: Per-channel scaling (RGB, 0-255) of models built without stain normalisation
#: (``stain_normalization=False`` in their spec; every preset normalises stain in-graph).
NORM_MEAN = (0.0, 0.0, 0.0)
NORM_STD = (255.0, 255.0, 255.0)
#: Grey level used to pad the letterbox (RGB, 0-255).
LETTERBOX_FILL = 114
#: Camera black (the corners of a round field of view, a black margin): an area whose
#: brightest channel stays below this (0-255) is no stain and no clump, only no light. Even
#: the densest stained nucleus passes one channel far above it. The models' stain
#: normalisation and the field-quality measures both leave it out.
CAMERA_BLACK_LEVEL = 32.0
#: Number of optional lab values the diagnosis model accepts (with a presence mask).
N_LAB_VALUES = 4
LAB_VALUE_NAMES = ("wbc_per_nl", "hemoglobin_g_dl", "platelets_per_nl", "ldh_u_l")

# ---------------------------------------------------------------------- request limits
#: Encoded bytes above this are refused before decoding.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: Decoded pixel count (width * height) above this is refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192
#: File size above which a file the client decodes itself (TIFF, BMP, WebP, HEIF, 16-bit
#: PNG) is refused: an uncompressed 8-bit RGB image at MAX_IMAGE_PIXELS (such files are
#: never sent as they are).
MAX_CLIENT_DECODED_BYTES = 3 * MAX_IMAGE_PIXELS
#: Smallest side accepted (a 1x1 image holds no cell).
MIN_IMAGE_SIDE = 16


# ----------------------------------------------------------- Triton model/tensor names
@dataclass(frozen=True)
class ModelNames:
    preprocess: str = "preprocess"
    detector: str = "detector"
    classifier: str = "classifier"
    pipeline: str = "pipeline"  # the per-image ensemble: preprocess -> detector -> classifier
    diagnosis: str = "diagnosis"


@dataclass(frozen=True)
class TensorNames:
    """The served tensors' names; their dtypes, shapes and meaning are in marrowdx.contract."""

    image: str = "IMAGE"
    pixels: str = "PIXELS"
    letterbox: str = "LETTERBOX"
    image_size: str = "IMAGE_SIZE"
    field_quality: str = "FIELD_QUALITY"
    boxes: str = "BOXES"
    scores: str = "SCORES"
    num_detections: str = "NUM_DETECTIONS"
    class_probs: str = "CLASS_PROBS"
    attribute_probs: str = "ATTRIBUTE_PROBS"
    class_counts: str = "CLASS_COUNTS"
    familiarity: str = "FAMILIARITY"
    total_cells: str = "TOTAL_CELLS"
    fractions: str = "FRACTIONS"
    lab_values: str = "LAB_VALUES"
    lab_mask: str = "LAB_MASK"
    diagnosis_probs: str = "DIAGNOSIS_PROBS"


MODELS = ModelNames()
TENSORS = TensorNames()

N_CLASSES = taxonomy.N_CLASSES
N_ATTRIBUTES = taxonomy.N_ATTRIBUTES
N_DIAGNOSES = taxonomy.N_DIAGNOSES


# ------------------------------------------------------------------------------ server
@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


DEFAULT_PORTS = Ports()
DEFAULT_URL = f"localhost:{DEFAULT_PORTS.grpc}"


# ------------------------------------------------------------------ client defaults
# (added by the client part; used by marrowdx.client, `marrowdx diagnose` and the demo)
#: Per-attempt deadline of one client request (s); a slower answer is retried.
CLIENT_REQUEST_TIMEOUT_S = 60.0
#: Total time one image (or one diagnosis call) keeps retrying transient failures (s):
#: long enough to ride out a server restart that reloads every model.
CLIENT_RETRY_TOTAL_S = 180.0
#: Image requests a client keeps in flight; Triton batches concurrent requests dynamically.
CLIENT_CONCURRENCY = 8
#: A cell whose top class probability (calibrated at build time) is below this is
#: "unidentified", as analysers mark low-confidence cells: listed for review, not counted in
#: the differential nor sent to the diagnosis. Why 0.6 and not 0.5 (no class beats all
#: others together): calibration is fitted on the labs the models learnt, and on real cells
#: of labs whose cell types they never learnt 0.5 left about 10% of the cells found wrong
#: yet counted, 0.6 about 5% (docs/unfamiliar_cells.md: the unidentified threshold).
UNIDENTIFIED_BELOW = 0.6


# ------------------------------------------------------------------------------- paths
def project_root() -> Path:
    """The checkout root (where pyproject.toml lives), for build outputs in a dev install."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists():
            return parent
    return Path.cwd()


def default_model_repository() -> Path:
    return Path(os.environ.get("MARROWDX_MODEL_REPOSITORY", project_root() / "model_repository"))


def default_work_dir() -> Path:
    """Where trained weights, ONNX files and caches go (git-ignored)."""
    return Path(os.environ.get("MARROWDX_WORK_DIR", project_root() / "build"))
