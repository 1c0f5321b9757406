"""Helpers shared by the test suite: bad-input corpus, synthetic ONNX graphs, server faults."""

from marrowdx import config

#: Everything the fixtures build lives here (git-ignored, reused across sessions).
TEST_CACHE = config.project_root() / "build" / "test-cache"
