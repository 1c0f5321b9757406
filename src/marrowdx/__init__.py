"""marrowdx: bone-marrow smear images to a differential cell count and a leukemia diagnosis.

This top-level package stays import-light on purpose: ``marrowdx.client`` is installed on
lab workstations with only tritonclient and numpy, and importing it must not pull in torch,
onnxruntime or DALI.
"""

__version__ = "0.1.0"
