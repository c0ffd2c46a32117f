"""Where the pinned binaries built by `make deps` (scripts/deps/build-tools.sh) are found."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "scripts" / "deps" / "versions.env"


class ToolMissing(RuntimeError):
    """A binary the tests or the demo need has not been built."""


def cache_dir() -> Path:
    """The cache outside the checkout ($SLM_CACHE_DIR, else $XDG_CACHE_HOME/slm-monitoring)."""
    explicit = os.environ.get("SLM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slm-monitoring"


def bin_dir() -> Path:
    return Path(os.environ.get("SLM_BIN_DIR", REPO_ROOT / ".bin"))


def versions() -> dict[str, str]:
    """The pinned versions, e.g. {"KUBERNETES_VERSION": "v1.35.4", ...}."""
    pinned: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pinned[key.strip()] = value.strip()
    return pinned


def tool(name: str) -> str:
    """Absolute path of a pinned binary (kube-apiserver, etcd, promtool, helm, …).

    Looks in .bin (made by `make deps`) only, never on PATH: a system kubectl or prometheus of
    another version would make the tests measure something else.
    """
    path = bin_dir() / name
    if path.exists():
        return str(path)
    raise ToolMissing(f"{name} not found in {bin_dir()}: run `make deps` (builds it into {cache_dir()}).")


def crd_dir_prometheus_operator() -> Path:
    """The Prometheus Operator CRDs exactly as the pinned release ships them."""
    path = bin_dir() / "prometheus-operator-crds"
    if not path.is_dir():
        raise ToolMissing(f"{path} missing: run `make deps`.")
    return path


def have(name: str) -> bool:
    return (bin_dir() / name).exists()
