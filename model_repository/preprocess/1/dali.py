"""preprocess (gpu target): the DALI backend autoserializes this file when the model loads.

It wraps the one preprocessing graph, marrowdx.preprocess.preprocess_graph, with device="gpu"
(nvJPEG "mixed" decoder). `marrowdx build --target gpu` places a copy of the marrowdx core
sources next to this file (marrowdx_src/), so the NGC container needs no marrowdx install;
an installed marrowdx takes precedence only if the copy is absent.
"""

import sys
from pathlib import Path

from nvidia.dali import pipeline_def
from nvidia.dali.plugin.triton import autoserialize

_VENDORED = Path(__file__).resolve().parent / "marrowdx_src"
if _VENDORED.is_dir():
    sys.path.insert(0, str(_VENDORED))

from marrowdx.preprocess import preprocess_graph  # noqa: E402

#: Must be >= max_batch_size in configs/gpu.pbtxt.
MAX_BATCH_SIZE = 32
#: Host threads for the mixed decoder; the config's num_threads parameter overrides it.
NUM_THREADS = 4


@autoserialize
@pipeline_def(batch_size=MAX_BATCH_SIZE, num_threads=NUM_THREADS, device_id=0)
def preprocess():
    return preprocess_graph(device="gpu")
