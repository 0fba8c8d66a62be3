"""Packaging and shipping: Dockerfile, pyproject, Makefile, .ci/run, example configs, Kubernetes.

These read files and run `python -m proxy check`; nothing here builds an image or
needs a network. The tests share their fixtures, so each carries its own marker:
`live` where it runs `python -m proxy`, `unit` where it only reads files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_IN_IMAGE = "/etc/turnout/turnout.yaml"
K8S = ROOT / "deploy" / "kubernetes"


def turnout(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_checks(path: Path) -> None:
    result = turnout("check", "-c", str(path))
    assert result.returncode == 0, f"turnout check -c {path}:\n{result.stdout}{result.stderr}"


# ------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and (not line or line.startswith("#")):
            continue  # a blank or comment line inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD arguments: a JSON array (exec form), else shell words."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return ["/bin/sh", "-c", args]


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1] :]


@pytest.fixture(scope="module")
def image() -> list[tuple[str, str]]:
    return final_stage(dockerfile_instructions((ROOT / "Dockerfile").read_text()))


def only(stage: list[tuple[str, str]], word: str) -> str:
    found = [args for w, args in stage if w == word]
    assert found, f"no {word} in the Dockerfile's final stage"
    return found[-1]


@pytest.mark.unit
def test_dockerfile_parser_handles_continuations_comments_and_json() -> None:
    text = 'FROM x\n# c\nRUN a \\\n  # inner\n  && b\nCMD ["run", "-c", "/f"]\n'
    assert dockerfile_instructions(text) == [
        ("FROM", "x"),
        ("RUN", "a  && b"),
        ("CMD", '["run", "-c", "/f"]'),
    ]
    assert exec_form('["a", "b"]') == ["a", "b"]
    assert exec_form("a b") == ["/bin/sh", "-c", "a b"]


@pytest.mark.unit
def test_base_image_is_slim_python_3_11_or_newer(image: list[tuple[str, str]]) -> None:
    base = only(image, "FROM").split()[0]  # drop `AS name`
    m = re.fullmatch(r"(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)(?:\.\d+)?-slim\S*", base)
    assert m, f"base image {base!r} is not python:3.X-slim"
    assert (int(m[1]), int(m[2])) >= (3, 11)


@pytest.mark.unit
def test_runs_as_a_non_root_user(image: list[tuple[str, str]]) -> None:
    words = [w for w, _ in image]
    entry = words.index("ENTRYPOINT")
    users = [args for w, args in image[:entry] if w == "USER"]
    assert users, "no USER before ENTRYPOINT: the container would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    assert group not in ("root", "0"), f"USER {users[-1]} has the root group"
    assert "USER" not in words[entry:], "USER changes after ENTRYPOINT"


@pytest.mark.unit
def test_effective_command_runs_the_bundled_config(image: list[tuple[str, str]]) -> None:
    command = exec_form(only(image, "ENTRYPOINT")) + exec_form(only(image, "CMD"))
    assert command == ["turnout", "run", "-c", CONFIG_IN_IMAGE], shlex.join(command)


@pytest.mark.unit
def test_exposes_proxy_and_admin_ports(image: list[tuple[str, str]]) -> None:
    ports = {p.split("/")[0] for w, args in image if w == "EXPOSE" for p in args.split()}
    assert {"8080", "9901"} <= ports


@pytest.mark.unit
def test_healthcheck_asks_the_admin_healthz(image: list[tuple[str, str]]) -> None:
    check = only(image, "HEALTHCHECK")
    assert "127.0.0.1:9901/healthz" in check and "urllib" in check


@pytest.mark.live
def test_bundled_config_passes_check_as_laid_out_in_the_image(
    image: list[tuple[str, str]], tmp_path: Path
) -> None:
    """Rebuild the image's /etc/turnout from the COPY lines, then check the config there.

    This catches a config whose cohort files were not copied next to it.
    """
    etc = "/etc/turnout/"
    copies = [args.split() for w, args in image if w == "COPY"]
    copies = [c for c in copies if not c[0].startswith("--") and c[-1].startswith(etc)]
    assert any(c[-1] == CONFIG_IN_IMAGE for c in copies), f"nothing is copied to {CONFIG_IN_IMAGE}"
    for *sources, dest in copies:
        target = tmp_path / dest[len(etc) :]
        for source in map(ROOT.joinpath, sources):
            assert source.exists(), f"COPY source {source} is missing"
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                into_dir = dest.endswith("/") or len(sources) > 1
                path = target / source.name if into_dir else target
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, path)
    assert_checks(tmp_path / Path(CONFIG_IN_IMAGE).name)


@pytest.mark.unit
def test_image_installs_the_package_built_in_its_own_stage(image: list[tuple[str, str]]) -> None:
    """A first stage (with a C compiler) builds the compiled wheel; the image installs it."""
    stages = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    build = stages[: stages.index(image[0])]
    copied = " ".join(args for w, args in build if w == "COPY")
    for needed in ("pyproject.toml", "setup.py", "README.md", "proxy/"):
        assert needed in copied
    assert any(w == "RUN" and "gcc" in args for w, args in build)
    assert any(w == "RUN" and "pip wheel" in args for w, args in build)
    name = only(build, "FROM").split()[-1]
    assert any(w == "COPY" and args.startswith(f"--from={name} ") for w, args in image)
    assert any(w == "RUN" and "pip install --no-cache-dir" in args for w, args in image)


@pytest.mark.unit
def test_dockerignore_keeps_what_the_image_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert "*" in rules or ".venv" in rules, ".venv and .git must stay out of the build context"
    if "*" in rules:  # an allowlist: everything the Dockerfile copies is let back in
        for needed in (
            "!pyproject.toml",
            "!setup.py",
            "!README.md",
            "!proxy/",
            "!config/turnout.yaml",
            "!config/cohorts/",
        ):
            assert needed in rules


# ------------------------------------------------------------------------- pyproject


@pytest.mark.unit
def test_pyproject_declares_the_turnout_distribution() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "turnout"
    assert project["scripts"]["turnout"] == "proxy.cli:main"
    spec = project["requires-python"].replace(" ", "")
    m = re.fullmatch(r">=3\.(\d+)", spec)
    assert m and int(m[1]) >= 11, f"requires-python {spec!r}"
    extras = project["optional-dependencies"]
    assert "test" in extras and "bench" in extras


@pytest.mark.live
def test_python_m_proxy_help_works() -> None:
    result = turnout("--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "check", "demo"):
        assert command in result.stdout


# What `turnout run` imports, then the state store it builds for each backend: redis-py
# (about 8 MiB of a process's RSS) is loaded by the Redis backend alone.
_STORE_PROBE = """
import sys
import proxy.cli, proxy.server
from proxy.config import parse
before = sorted(m for m in sys.modules if m.split(".")[0] == "redis")
base = (
    "listen: 127.0.0.1:1\\nstable: blue\\ncanary: green\\nversions:\\n"
    "  blue: {endpoints: [http://127.0.0.1:2]}\\n  green: {endpoints: [http://127.0.0.1:3]}\\n"
)
file_store = proxy.server.fleet_store(parse(base, "/nonexistent/turnout.yaml"))
after_file = sorted(m for m in sys.modules if m.split(".")[0] == "redis")
doc = base + "state: {backend: redis, redis: {url: 'redis://127.0.0.1:1/0'}}\\n"
redis_store = proxy.server.fleet_store(parse(doc, "/nonexistent/turnout.yaml"))
print(before, after_file, file_store, type(redis_store).__name__, "redis.asyncio" in sys.modules)
"""


@pytest.mark.live
def test_redis_py_is_loaded_only_by_a_proxy_whose_state_is_in_redis() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _STORE_PROBE],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "[]", "None", "Redis", "True"], result.stdout


# ------------------------------------------------------------------- Makefile and CI


@pytest.mark.unit
def test_makefile_has_the_documented_targets() -> None:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))
    assert {"venv", "demo", "test", "lint", "bench", "clean"} <= targets
    assert re.search(r"^PYTHON\s*\?=\s*python3\s*$", text, re.M)
    assert re.search(r"^test:.*\bvenv\b", text, re.M), "make test must create the venv"


@pytest.mark.unit
def test_ci_runs_make_test() -> None:
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    text = ci.read_text()
    assert text.startswith("#!") and "bash" in text.splitlines()[0]
    assert "set -euo pipefail" in text
    assert "DEBIAN_FRONTEND=noninteractive" in text
    code = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    assert "make test" in code or "exec make test" in code


# ------------------------------------------------------------------ example configs


CONFIGS = sorted(p for ext in ("*.yaml", "*.yml") for p in (ROOT / "config").rglob(ext))


@pytest.mark.unit
def test_there_are_example_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"turnout.yaml", "demo.yaml"} <= names


@pytest.mark.live
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_config_passes_check(path: Path) -> None:
    assert_checks(path)


@pytest.mark.unit
def test_example_config_keeps_the_admin_api_on_loopback() -> None:
    doc = yaml.safe_load((ROOT / "config" / "turnout.yaml").read_text())
    assert doc["admin"]["listen"].startswith("127.0.0.1:")


# ------------------------------------------------------------------------ Kubernetes


def manifests() -> list[dict]:
    files = sorted(K8S.glob("*.yaml"))
    assert files, "no manifests in deploy/kubernetes"
    docs = [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]
    assert all(isinstance(doc, dict) and "kind" in doc for doc in docs)
    return docs


def kind(kind_name: str) -> list[dict]:
    found = [doc for doc in manifests() if doc["kind"] == kind_name]
    assert found, f"no {kind_name} in deploy/kubernetes"
    return found


def sidecar() -> tuple[dict, dict]:
    """(pod template, the turnout container) of the Deployment."""
    template = kind("Deployment")[0]["spec"]["template"]
    containers = template["spec"]["containers"]
    found = [c for c in containers if c["name"] == "turnout"]
    assert found, "no container named turnout"
    assert len(containers) > 1, "the sidecar needs the app container(s) beside it"
    return template, found[0]


@pytest.mark.live
def test_configmap_turnout_yaml_passes_check(tmp_path: Path) -> None:
    (configmap,) = [cm for cm in kind("ConfigMap") if "turnout.yaml" in cm["data"]]
    path = tmp_path / "turnout.yaml"
    path.write_text(configmap["data"]["turnout.yaml"])
    assert_checks(path)
    doc = yaml.safe_load(path.read_text())
    assert doc["admin"]["listen"] == "0.0.0.0:9901", "the kubelet must reach the probes"
    for version in doc["versions"].values():
        assert all(url.startswith("http://127.0.0.1:") for url in version["endpoints"])


@pytest.mark.unit
def test_sidecar_mounts_the_configmap_folder_and_is_probed() -> None:
    template, container = sidecar()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts["/etc/turnout"]
    assert "subPath" not in mount, "a subPath mount never receives ConfigMap updates"
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert "configMap" in volumes[mount["name"]]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 9901


@pytest.mark.unit
def test_pod_runs_as_non_root_and_is_scraped() -> None:
    template, container = sidecar()
    pod_security = template["spec"].get("securityContext", {})
    own_security = container.get("securityContext", {})
    assert pod_security.get("runAsNonRoot") or own_security.get("runAsNonRoot")
    assert (own_security.get("runAsUser") or pod_security.get("runAsUser")) != 0
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9901"
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.unit
def test_service_sends_port_80_to_the_proxy() -> None:
    _, container = sidecar()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service,) = kind("Service")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert ports.get(port["targetPort"], port["targetPort"]) == 8080
