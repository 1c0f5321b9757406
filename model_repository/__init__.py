"""Package data, not code: the hand-written Triton model sources, shipped in the marrowdx wheel
as ``marrowdx.model_repository`` and located by ``marrowdx.resources`` without importing this
package (an import would write a ``__pycache__`` folder here, which Triton would take for a
model). Triton itself ignores this file: it loads sub-folders only.
"""
