"""deploy/README.md: the runbook names concrete commands for every step."""

from __future__ import annotations

from tests.helpers.deploy import DEPLOY, KUSTOMIZATIONS


def test_runbook_is_concrete() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "kubectl apply -k deploy/k8s/overlays/gpu-prod",
        "kubectl apply -k deploy/k8s/engine-build",
        "marrowdx build --target gpu",
        "marrowdx export --tensorrt",
        "docker build",
        "sha256:",
        "MODEL_RELEASE",
        "nv_inference_queue_duration_us",
        "s3://",
        "create secret generic",
        "rollout status",
        "not measured",
    ):
        assert needle in text, f"runbook lacks {needle!r}"
    for name in KUSTOMIZATIONS:
        assert f"deploy/k8s/{name}" in text, name
