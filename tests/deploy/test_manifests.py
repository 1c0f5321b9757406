"""deploy/k8s: every kustomization rendered by the real ``kubectl kustomize`` and validated
strictly against the Kubernetes 1.37 schemas shipped in kubernetes-validate (the PodMonitor,
a prometheus-operator resource it has no schema for, field by field); then the invariants the
runbook relies on: probes, GPU limits, non-root, read-only root, restricted admin protocols,
the HPA metric the prometheus-adapter rule produces, and the engine build on the serving GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from marrowdx import config
from tests.helpers.deploy import (
    ADMIN_PROTOCOLS,
    DEPLOY,
    DIGEST,
    GPU,
    K8S_VERSION,
    KUSTOMIZATIONS,
    NGC_IMAGE,
    OVERLAYS,
    STARTUP_BUDGET_S,
    container,
    flags,
    kinds,
    one,
)

# --------------------------------------------------------------------- schema validation
#: prometheus-operator's PodMonitor (monitoring.coreos.com/v1), restricted to the fields this
#: project uses; anything else is rejected so a typo cannot pass silently.
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object"}},
                },
                "namespaceSelector": {"type": "object"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^\d+[smh]$"},
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("name", [*KUSTOMIZATIONS, "gpu-prod+s3"])
def test_manifests_validate_strictly(rendered: dict[str, list[dict]], name: str) -> None:
    import jsonschema
    import kubernetes_validate

    for doc in rendered[name]:
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "PodMonitor":
            jsonschema.validate(doc, PODMONITOR_SCHEMA)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")


def test_overlays_hold_the_serving_stack(rendered: dict[str, list[dict]]) -> None:
    serving = {
        "Deployment",
        "Service",
        "PodMonitor",
        "NetworkPolicy",
        "ConfigMap",
        "PersistentVolumeClaim",
        "ServiceAccount",
    }
    assert serving | {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds(
        rendered["overlays/gpu-prod"]
    )
    assert serving <= kinds(rendered["overlays/cpu-dev"])
    # one replica in dev: an autoscaler or a disruption budget would only get in the way
    assert not {"HorizontalPodAutoscaler", "PodDisruptionBudget"} & kinds(
        rendered["overlays/cpu-dev"]
    )
    assert one(rendered["overlays/cpu-dev"], "Deployment")["spec"]["replicas"] == 1
    assert one(rendered["overlays/gpu-prod"], "Deployment")["metadata"]["namespace"] == "marrowdx"


# ------------------------------------------------------------------------- the Deployment
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_container_is_hardened_and_probed(
    rendered: dict[str, list[dict]], overlay: str
) -> None:
    deploy = one(rendered[f"overlays/{overlay}"], "Deployment", "marrowdx-triton")
    pod = deploy["spec"]["template"]["spec"]
    triton = container(pod, "triton")

    image = triton["image"]
    assert DIGEST.search(image), f"image not pinned by digest: {image}"
    assert ":24.10" in image, image  # the NGC tritonserver 24.10 release (Triton 2.51)
    assert triton["command"] == ["tritonserver"]

    args = flags(triton["args"])
    assert args["model-control-mode"] == "none"
    assert args["model-repository"] == "/models/releases/$(MODEL_RELEASE)"
    assert (args["http-port"], args["grpc-port"], args["metrics-port"]) == (
        str(config.DEFAULT_PORTS.http),
        str(config.DEFAULT_PORTS.grpc),
        str(config.DEFAULT_PORTS.metrics),
    )
    for flag in ("grpc-restricted-protocol", "http-restricted-api"):
        protocols, key = args[flag].split(":", 1)
        assert ADMIN_PROTOCOLS <= set(protocols.split(",")), f"{flag} leaves {ADMIN_PROTOCOLS} open"
        assert key == "admin-key=$(TRITON_ADMIN_KEY)", key
    env = {e["name"]: e for e in triton["env"]}
    assert env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "admin-key"
    assert "value" not in env["TRITON_ADMIN_KEY"], "the admin key must come from a Secret"
    release_cm = env["MODEL_RELEASE"]["valueFrom"]["configMapKeyRef"]["name"]
    one(rendered[f"overlays/{overlay}"], "ConfigMap", release_cm)  # hashed name resolved

    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_BUDGET_S

    pod_sec, sec = pod["securityContext"], triton["securityContext"]
    assert pod_sec["runAsNonRoot"] is True and pod_sec["runAsUser"] != 0
    assert sec["readOnlyRootFilesystem"] is True
    assert sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    assert "/tmp" in mounts  # writable scratch beside the read-only root
    assert mounts["/models"]["readOnly"] is True

    res = triton["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    spread = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in spread
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_gpu_prod_requests_a_gpu_and_checks_engines(rendered: dict[str, list[dict]]) -> None:
    pod = one(rendered["overlays/gpu-prod"], "Deployment")["spec"]["template"]["spec"]
    triton = container(pod, "triton")
    assert triton["resources"]["limits"][GPU] == "1"
    assert triton["resources"]["requests"][GPU] == "1"
    assert pod["nodeSelector"]["nvidia.com/gpu.product"]
    check = container(pod, "engine-check", init=True)
    # the check script lives in the image built from deploy/docker, not in the stock NGC one
    assert check["image"] == triton["image"]
    assert not triton["image"].startswith(NGC_IMAGE + ":"), "gpu-prod must run the marrowdx image"
    assert check["command"][-1] == "verify" and "engine_manifest.py" in " ".join(check["command"])
    assert check["args"] == ["/models/releases/$(MODEL_RELEASE)"]
    assert check["resources"]["limits"][GPU] == "1"  # nvidia-smi must see the pod's GPU


def test_cpu_dev_has_no_gpu(rendered: dict[str, list[dict]]) -> None:
    pod = one(rendered["overlays/cpu-dev"], "Deployment")["spec"]["template"]["spec"]
    for c in pod["containers"] + (pod.get("initContainers") or []):
        for section in ("requests", "limits"):
            assert GPU not in c.get("resources", {}).get(section, {})
    assert "nodeSelector" not in pod


def test_s3_component_serves_from_the_bucket(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["gpu-prod+s3"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    triton = container(pod, "triton")
    assert flags(triton["args"])["model-repository"].startswith("s3://")
    env = {e["name"]: e for e in triton["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"]
    assert "/models" not in {m["mountPath"] for m in triton["volumeMounts"]}
    assert "PersistentVolumeClaim" not in kinds(docs)


# ------------------------------------------------------------- service, scaling, network
def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_pdb_monitor_select_the_pods(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["overlays/gpu-prod"]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = one(docs, "Service")
    assert _selects(svc["spec"]["selector"], labels)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    assert _selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    monitor = one(docs, "PodMonitor")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], labels)
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_hpa_scales_on_the_adapter_queue_time_metric(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["overlays/gpu-prod"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        one(docs, "Deployment")["metadata"]["name"],
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]

    adapter = one(rendered["monitoring"], "ConfigMap")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == name]
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us")
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert hpa["spec"]["minReplicas"] >= 2  # the PDB then always leaves one pod serving


def test_network_policy_admits_only_clients_and_scraper(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["overlays/gpu-prod"]
    policy = one(docs, "NetworkPolicy")
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    allowed = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every source"
        for peer in rule["from"]:
            assert "namespaceSelector" in peer and "ipBlock" not in peer
        ns = rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        allowed[ns] = {p["port"] for p in rule["ports"]}
    assert allowed == {"marrowdx-clients": {"grpc", "http"}, "monitoring": {"metrics"}}


# ------------------------------------------------------------------------ engine build Job
def test_engine_build_job_runs_on_the_serving_gpu(rendered: dict[str, list[dict]]) -> None:
    job_docs = rendered["engine-build"]
    job = one(job_docs, "Job")
    pod = job["spec"]["template"]["spec"]
    serving = one(rendered["overlays/gpu-prod"], "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == serving["nodeSelector"]
    assert (
        job["metadata"]["namespace"]
        == one(rendered["overlays/gpu-prod"], "Deployment")["metadata"]["namespace"]
    )
    build = container(pod, "build")
    assert build["resources"]["limits"][GPU] == "1"
    assert DIGEST.search(build["image"])
    script = DEPLOY / "scripts" / Path(build["command"][0]).name
    assert script.exists() and os.access(script, os.X_OK)
    text = script.read_text()
    assert "marrowdx build --target gpu" in text and "marrowdx export --tensorrt" in text
    assert 'engine_manifest.py" record' in text and 'engine_manifest.py" verify' in text
    claim = {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"]
    one(rendered["overlays/gpu-prod"], "PersistentVolumeClaim", claim)

    def release(docs: list[dict], prefix: str) -> str:
        (cm,) = [
            d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix)
        ]
        return cm["data"]["MODEL_RELEASE"]

    # the Job publishes the release the Deployment serves
    assert release(job_docs, "marrowdx-engine-release") == release(
        rendered["overlays/gpu-prod"], "marrowdx-release"
    )
