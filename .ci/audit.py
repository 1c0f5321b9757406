"""Audit the project's dependency set with pip-audit; fail on vulnerabilities that have a fix.

Run by ``tests/test_security.py`` (so ``make test`` and CI run it) and by hand:

    .venv/bin/python .ci/audit.py                      # the installed (pinned) environment
    .venv/bin/python .ci/audit.py -r requirements.lock # a fully pinned lock file

Exit status: 0 no fixable vulnerability, 1 at least one vulnerability with a fixed release
(listed on stdout), 3 the vulnerability database could not be reached (nothing audited).
A vulnerability with no fix yet is reported but does not fail: there is nothing to move to.

Why a probe first: pip-audit asks PyPI's per-release JSON API once per package with a 15 s
timeout; on a machine that cannot reach it that is minutes of waiting for 130 packages,
and behind a proxy that answers 404 every package is silently "not found" and the audit
passes vacuously. The probe turns both into a clear "unreachable" (exit 3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata

#: The per-release endpoint pip-audit's default ("pypi") service queries.
PYPI_RELEASE_JSON = "https://pypi.org/pypi/{name}/{version}/json"
PROBE_TIMEOUT_S = 10
AUDIT_TIMEOUT_S = 600
EXIT_OK, EXIT_VULNERABLE, EXIT_UNREACHABLE = 0, 1, 3


@dataclass(frozen=True)
class Finding:
    package: str
    version: str
    vuln_id: str
    fix_versions: tuple[str, ...]


def probe_vulnerability_db(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when PyPI's per-release JSON (with ``vulnerabilities``) answers, else why not."""
    url = PYPI_RELEASE_JSON.format(name="pip", version=metadata.version("pip"))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{url}: {exc}"
    if "vulnerabilities" not in body:
        return f"{url}: answer has no 'vulnerabilities' field"
    return None


def run_pip_audit(requirements: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pip_audit", "--format", "json", "--progress-spinner", "off"]
    cmd += ["--desc", "off", "--aliases", "off"]
    if requirements:
        # A lock file is fully pinned: audit exactly its versions, resolve nothing.
        for req in requirements:
            cmd += ["--requirement", req]
        cmd += ["--no-deps", "--disable-pip"]
    else:
        # The environment `make setup` installed from the pinned pyproject; the project
        # itself is an editable install that is not on PyPI.
        cmd += ["--local", "--skip-editable"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=AUDIT_TIMEOUT_S)
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        raise RuntimeError(
            f"pip-audit failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return json.loads(proc.stdout)


def findings(report: dict) -> list[Finding]:
    out = []
    for dep in report.get("dependencies", []):
        for vuln in dep.get("vulns", []):
            out.append(
                Finding(
                    dep["name"],
                    dep.get("version", "?"),
                    vuln["id"],
                    tuple(vuln.get("fix_versions", ())),
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-r", "--requirement", action="append", default=[], help="pinned lock file(s)"
    )
    args = parser.parse_args(argv)

    why = probe_vulnerability_db()
    if why is not None:
        print(f"vulnerability database unreachable, nothing audited: {why}")
        return EXIT_UNREACHABLE
    code, lines = verdict(run_pip_audit(args.requirement))
    print("\n".join(lines))
    return code


def verdict(report: dict) -> tuple[int, list[str]]:
    """Exit status and report lines for one pip-audit JSON report."""
    deps = report.get("dependencies", [])
    audited = [d for d in deps if "skip_reason" not in d]
    if not audited:
        return EXIT_UNREACHABLE, [f"vulnerability database unreachable: all {len(deps)} skipped"]
    # e.g. torch's local "+cpu" version is not a PyPI release
    lines = [
        f"not audited: {d['name']}: {d['skip_reason']}"
        for d in deps
        if "skip_reason" in d and "editable" not in d["skip_reason"]
    ]
    found = findings(report)
    fixable = [f for f in found if f.fix_versions]
    for f in found:
        tag = "FIXABLE" if f.fix_versions else "unfixed"
        fix = ", ".join(f.fix_versions) or "no fix released"
        lines.append(f"{tag} {f.package}=={f.version} {f.vuln_id} (fixed in: {fix})")
    lines.append(
        f"audited {len(audited)} packages: {len(found)} known vulnerabilities, "
        f"{len(fixable)} with a fix"
    )
    return (EXIT_VULNERABLE if fixable else EXIT_OK), lines


if __name__ == "__main__":
    sys.exit(main())
