"""Security: gRPC over TLS with a throwaway CA, admin endpoints behind a key by default,
loopback-only by default, no patient identifiers or image content in logs, and the
dependency audit (pip-audit) over the installed, pinned dependency set.

The servers here are started through ``marrowdx serve`` itself, because its defaults are
what is under test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from marrowdx import config
from tests.helpers import bad_inputs
from tests.helpers.reliability import (
    TEST_CACHE,
    Served,
    infer_image,
    raw_client,
    run_cli,
    serve_process,
    simulated_fields,
)

ROOT = config.project_root()
AUDIT_SCRIPT = ROOT / ".ci" / "audit.py"
#: Seconds one connection attempt may take before it counts as refused.
CONNECT_TIMEOUT_S = 10.0
#: Markers of encoded image bytes in text: raw magic, hex, Python byte escapes, base64 of the
#: JPEG/PNG signatures, and any long base64-looking run.
IMAGE_CONTENT_PATTERNS = (
    re.compile(r"\xff\xd8\xff"),
    re.compile(r"ffd8ff", re.I),
    re.compile(r"\\xff\\xd8"),
    re.compile(r"/9j/"),
    re.compile(r"iVBORw0KGgo"),
    re.compile(r"\x89PNG"),
    re.compile(r"[A-Za-z0-9+/]{200,}={0,2}"),
)


# ------------------------------------------------------------------------------ servers
@pytest.fixture
def serve(built_repository, tmp_path) -> Iterator:
    """Factory: ``serve(*flags, env=...)`` starts ``marrowdx serve``, waits for "ready",
    and stops it when the test ends."""
    count = iter(range(1_000))
    with contextlib.ExitStack() as stack:

        def start(*flags: str, env: dict[str, str] | None = None) -> Served:
            folder = tmp_path / f"serve{next(count)}"
            return stack.enter_context(serve_process(built_repository, folder, *flags, env=env))

        yield start


# ---------------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for the loopback names, and an unrelated CA."""
    import trustme

    folder = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {
        "ca": folder / "ca.pem",
        "other_ca": folder / "other-ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other.cert_pem.write_to_path(str(paths["other_ca"]))
    with open(paths["cert"], "wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    cert.private_key_pem.write_to_path(str(paths["key"]))
    os.chmod(paths["key"], 0o600)
    return paths


def _live(url: str, **tls) -> bool:
    from tritonclient.utils import InferenceServerException

    c = raw_client(url, **tls)
    try:
        return bool(c.is_server_live(client_timeout=CONNECT_TIMEOUT_S))
    except InferenceServerException:
        return False
    finally:
        c.close()


@pytest.mark.server
def test_grpc_over_tls_with_a_throwaway_ca(serve, certificates, tmp_path) -> None:
    from marrowdx.client import MarrowClient

    served = serve("--tls-cert", str(certificates["cert"]), "--tls-key", str(certificates["key"]))
    ca = str(certificates["ca"])
    assert _live(served.grpc_url, ssl=True, root_certificates=ca)
    assert not _live(served.grpc_url), "plaintext gRPC accepted by a TLS server"
    assert not _live(served.grpc_url, ssl=True, root_certificates=str(certificates["other_ca"])), (
        "a certificate from an unknown CA was trusted"
    )
    field = simulated_fields(tmp_path / "fields", 1, seed=31)[0]
    with MarrowClient(served.grpc_url, ssl=True, root_certificates=ca, retry_total_s=30) as client:
        report = client.diagnose_patient("P-TLS", [field])
    assert report.n_images == 1 and not report.failed_images, report.failed_images
    # ... and the same through the command line
    cohort = tmp_path / "cohort"
    (cohort / "P-TLS").mkdir(parents=True)
    (cohort / "P-TLS" / "a.jpg").write_bytes(field)
    proc = run_cli(
        ["diagnose", str(cohort), "--url", served.grpc_url, "--ssl", "--root-certificates", ca,
         "--json", str(tmp_path / "out.json"), "--no-progress", "--retry-seconds", "30"]
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr  # 1 only if the tiny models find no cell
    assert json.loads((tmp_path / "out.json").read_text())["patients"][0]["n_images"] == 1


def test_tls_needs_both_certificate_and_key(built_repository, certificates) -> None:
    """A certificate without its key is refused up front (never a plaintext fallback)."""
    from marrowdx.serving.server import free_ports

    ports = [str(p) for p in free_ports(3)]
    proc = run_cli(
        ["serve", "--repository", str(built_repository), "--http-port", ports[0],
         "--grpc-port", ports[1], "--metrics-port", ports[2], "--work-dir", str(TEST_CACHE),
         "--tls-cert", str(certificates["cert"])],
        timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "tls" in (proc.stderr + proc.stdout).lower(), proc.stderr


# ------------------------------------------------------------------ restricted endpoints
def _admin_calls(client, headers: dict[str, str] | None) -> dict[str, str | None]:
    """Each admin API: None when allowed, else the server's error text."""
    from tritonclient.utils import InferenceServerException

    calls = {
        "repository index": lambda: client.get_model_repository_index(headers=headers),
        "unload model": lambda: client.unload_model("no-such-model", headers=headers),
        "shared-memory register": lambda: client.register_system_shared_memory(
            "marrowdx-test", "/marrowdx-test-does-not-exist", 64, headers=headers
        ),
        "shared-memory status": lambda: client.get_system_shared_memory_status(headers=headers),
        "statistics": lambda: client.get_inference_statistics(headers=headers),
    }
    out: dict[str, str | None] = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except InferenceServerException as exc:
            out[name] = f"{exc.status()}: {exc.message()}"
    return out


def _restricted(text: str | None) -> bool:
    return text is not None and ("PERMISSION_DENIED" in text or "restricted" in text.lower())


@pytest.mark.server
def test_admin_endpoints_need_the_key_inference_stays_open(serve, tmp_path) -> None:
    from marrowdx.serving.server import ADMIN_KEY_ENV, ADMIN_KEY_HEADER

    key = secrets.token_urlsafe(16)
    served = serve(env={ADMIN_KEY_ENV: key})
    assert key not in served.output(), "the admin key was printed"
    client = raw_client(served.grpc_url)
    try:
        denied = _admin_calls(client, None)
        assert all(_restricted(v) for v in denied.values()), denied
        wrong = _admin_calls(client, {ADMIN_KEY_HEADER: key + "x"})
        assert all(_restricted(v) for v in wrong.values()), wrong
        allowed = _admin_calls(client, {ADMIN_KEY_HEADER: key})
        # With the key the calls reach their handlers (which may still refuse on their own
        # grounds: no such model to unload in model-control-mode none, no such shm region).
        assert not any(_restricted(v) for v in allowed.values()), allowed
        assert allowed["repository index"] is None and allowed["statistics"] is None, allowed
        # Inference, health and metadata need no key.
        assert client.is_server_ready() and client.get_model_metadata(config.MODELS.pipeline)
        out = infer_image(client, bad_inputs.jpeg_bytes())
        assert config.TENSORS.class_counts in out
    finally:
        client.close()
    # The HTTP endpoint is restricted the same way.
    request = urllib.request.Request(
        f"{served.http_url}/v2/repository/index", data=b"{}", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S)
    assert info.value.code in (401, 403), info.value.code
    request.add_header(ADMIN_KEY_HEADER, key)
    with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as resp:
        assert resp.status == 200


def _listen_addresses(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on ``port`` (read from /proc, no traffic sent)."""
    import psutil

    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    }


def _is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.mark.server
def test_default_serve_is_restricted_and_loopback_only(serve) -> None:
    """No key configured at all: admin endpoints are still closed (a random key), and every
    port listens on 127.0.0.1 only."""
    env = {k: "" for k in ("MARROWDX_ADMIN_KEY",)}
    served = serve(env=env)
    for port in served.ports:
        addresses = _listen_addresses(port)
        assert addresses and all(_is_loopback(a) for a in addresses), (port, addresses)
    client = raw_client(served.grpc_url)
    try:
        denied = _admin_calls(client, None)
        assert all(_restricted(v) for v in denied.values()), denied
    finally:
        client.close()


def test_other_interfaces_need_the_explicit_bind_flag(built_repository) -> None:
    """--bind reaches all three Triton listeners; without it they are loopback (checked
    live above). Not started on 0.0.0.0: the tests send no traffic off loopback."""
    from marrowdx.serving.server import DEFAULT_BIND, ServerConfig, triton_arguments
    from marrowdx.serving.triton_install import TritonInstall

    install = TritonInstall(root=Path("/nonexistent"), libs_path=Path("/nonexistent"))
    assert DEFAULT_BIND == "127.0.0.1"
    for bind in ("127.0.0.1", "0.0.0.0"):
        args = triton_arguments(ServerConfig(repository=built_repository, bind=bind), install)
        for flag in ("--http-address", "--grpc-address", "--metrics-address"):
            assert f"{flag}={bind}" in args, args
    from marrowdx.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.bind == "127.0.0.1"


# ------------------------------------------------------------------------------- logging
@pytest.mark.server
def test_logs_hold_no_patient_identifiers_or_image_content(serve, tmp_path, caplog) -> None:
    """A verbose server and a client run over a cohort with odd patient ids and a bad
    image: neither Triton's log nor the client's log records name a patient or a file, or
    carry image bytes."""
    from marrowdx.client import MarrowClient
    from marrowdx.simulate import simulate_cohort

    log_file = tmp_path / "triton.log"
    served = serve("--log-verbose", "1", "--log-file", str(log_file))
    root = tmp_path / "cohort"
    gt = simulate_cohort(root, 2, 41, images_per_patient=2, size=(512, 512))
    # Rename the patients to identifiers that cannot occur by chance in a log.
    secrets_ids = {}
    for p in gt["patients"]:
        new = f"PATIENT-{secrets.token_hex(6)}"
        (root / p["patient_id"]).rename(root / new)
        for image in (root / new).iterdir():
            image.rename(image.with_name(f"scan-{secrets.token_hex(6)}{image.suffix}"))
        secrets_ids[new] = sorted(f.name for f in (root / new).iterdir())
    first = next(iter(secrets_ids))
    broken = bad_inputs.by_name(bad_inputs.corpus(include_heavy=False))["truncated_jpeg"].data
    (root / first / "broken-scan.jpg").write_bytes(broken)
    identifiers = (
        set(secrets_ids) | {n for names in secrets_ids.values() for n in names} | {"broken-scan"}
    )

    caplog.set_level(logging.DEBUG)
    with MarrowClient(served.grpc_url, retry_total_s=30) as client:
        for patient, names in secrets_ids.items():
            files = [root / patient / n for n in names]
            if patient == first:
                files.append(root / first / "broken-scan.jpg")
            report = client.diagnose_patient(patient, files)
            assert report.n_images == len(names)
    cli = run_cli(
        [
            "diagnose",
            str(root),
            "--url",
            served.grpc_url,
            "--json",
            str(tmp_path / "o.json"),
            "--no-progress",
        ]
    )
    assert cli.returncode == 1, cli.stderr  # the broken image
    time.sleep(1.0)  # let Triton flush its log file

    server_log = log_file.read_text(errors="replace") + served.output()
    assert "request id" in server_log, "the log is not verbose enough to show what clients send"
    client_log = "\n".join(r.getMessage() for r in caplog.records)
    for where, text in (("server log", server_log), ("client log records", client_log)):
        leaked = sorted(i for i in identifiers if i in text)
        assert not leaked, f"{where} names {leaked}"
        for pattern in IMAGE_CONTENT_PATTERNS:
            assert not pattern.search(text), f"{where} carries image content ({pattern.pattern})"
    # The CLI reports failed files by name on purpose (that is its output, not a log), but
    # never their bytes.
    for pattern in IMAGE_CONTENT_PATTERNS:
        assert not pattern.search(cli.stderr), (
            f"diagnose stderr carries image content ({pattern.pattern})"
        )


# ------------------------------------------------------------------------------ audit
def _audit_module():
    spec = importlib.util.spec_from_file_location("marrowdx_ci_audit", AUDIT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def test_audit_verdict_fails_only_on_fixable_vulnerabilities() -> None:
    audit = _audit_module()
    ok = {"name": "a", "version": "1", "vulns": []}
    unfixed = {"name": "b", "version": "2", "vulns": [{"id": "PYSEC-1", "fix_versions": []}]}
    fixable = {"name": "c", "version": "3", "vulns": [{"id": "GHSA-x", "fix_versions": ["3.1"]}]}
    editable = {"name": "marrowdx", "skip_reason": "distribution marked as editable"}
    assert audit.verdict({"dependencies": [ok, unfixed, editable]})[0] == audit.EXIT_OK
    code, lines = audit.verdict({"dependencies": [ok, unfixed, fixable]})
    assert code == audit.EXIT_VULNERABLE and any("c==3 GHSA-x" in line for line in lines)
    unreachable = {
        "name": "d",
        "skip_reason": "Dependency not found on PyPI and could not be audited",
    }
    assert audit.verdict({"dependencies": [unreachable, editable]})[0] == audit.EXIT_UNREACHABLE


def test_dependencies_have_no_known_fixable_vulnerabilities() -> None:
    """pip-audit over this environment (what `make setup` installed from the pinned
    pyproject). Skipped, with the reason, only when the vulnerability database cannot be
    reached from this machine."""
    proc = subprocess.run(
        [sys.executable, str(AUDIT_SCRIPT)], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    audit = _audit_module()
    if proc.returncode == audit.EXIT_UNREACHABLE:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == audit.EXIT_OK, proc.stdout + proc.stderr
