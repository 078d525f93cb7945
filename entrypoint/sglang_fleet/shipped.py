"""Data files shipped inside the package: presets, NCCL/GLOO profiles, Consul ACL policies.

They live in sglang_fleet/data/<kind>/ and are package data, so a source checkout, an installed wheel and
the container image find them the same way. Each kind may also be looked up first in a directory an
operator names (FLEET_PRESET_DIR, ...), and last in /etc/sglang-fleet/<kind>/ (site additions).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SITE_DIR = Path("/etc/sglang-fleet")


@dataclass(frozen=True)
class Kind:
    subdir: str
    suffix: str
    override_env: str  # an operator's directory, searched first


PRESETS = Kind("presets", ".yaml", "FLEET_PRESET_DIR")
NCCL_PROFILES = Kind("nccl", ".env", "FLEET_NCCL_DIR")
ACL_POLICIES = Kind("acl", ".hcl", "FLEET_ACL_DIR")


def package_dir(kind: Kind) -> Path:
    """Where the package's own copies are (a plain directory: the wheel is installed unzipped)."""
    return Path(str(resources.files("sglang_fleet").joinpath("data", kind.subdir)))


def search_dirs(kind: Kind) -> list[Path]:
    override = os.environ.get(kind.override_env, "").strip()
    return ([Path(override)] if override else []) + [package_dir(kind), SITE_DIR / kind.subdir]


def find(kind: Kind, name: str) -> Path | None:
    """`<name><suffix>` from the first directory holding it, or None."""
    if not name or "/" in name or name.startswith("."):
        return None
    for d in search_dirs(kind):
        path = d / f"{name}{kind.suffix}"
        if path.is_file():
            return path
    return None


def names(kind: Kind) -> list[str]:
    """Every name of this kind found in any directory, sorted."""
    return sorted({p.name.removesuffix(kind.suffix) for d in search_dirs(kind) if d.is_dir()
                   for p in d.glob(f"*{kind.suffix}")})


def searched(kind: Kind) -> str:
    """The directories, for an error message."""
    return ", ".join(str(d) for d in search_dirs(kind))


__all__ = ["ACL_POLICIES", "Kind", "NCCL_PROFILES", "PRESETS", "find", "names", "package_dir", "search_dirs",
           "searched"]
