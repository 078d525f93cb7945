"""NCCL/GLOO network profiles: which fabric this host has, and the variables that go with it.

Profiles live in data/nccl/<name>.env (shipped.py) (ethernet, infiniband, roce). `auto` reads sysfs:
`<sysfs_root>/class/infiniband/<dev>/ports/<port>/link_layer` says InfiniBand or Ethernet (= RoCE);
for RoCE the GID table (`gid_attrs/types/<i>`, `gids/<i>`) gives NCCL_IB_GID_INDEX. No RDMA device
means plain ethernet (NCCL_IB_DISABLE=1). The interface carrying the advertise address becomes
NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME; it is found without the `ip` command (GPU hosts lack it).
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sglang_fleet import shipped

if TYPE_CHECKING:
    from sglang_fleet.config import FleetConfig

PROFILES = ("ethernet", "infiniband", "roce")

SIOCGIFADDR = 0x8915  # linux/sockios.h: get the IPv4 address of an interface


class ProfileError(Exception):
    """A profile file is missing or malformed."""


@dataclass(frozen=True)
class Detection:
    profile: str
    reason: str
    devices: tuple[str, ...] = ()
    gid_index: int | None = None


@dataclass(frozen=True)
class NetProfile:
    name: str
    reason: str
    env: dict[str, str] = field(default_factory=dict)


def profile_path(name: str) -> Path:
    path = shipped.find(shipped.NCCL_PROFILES, name)
    if path is None:
        raise ProfileError(f"NCCL profile {name!r} not found in {shipped.searched(shipped.NCCL_PROFILES)}")
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=VALUE lines; '#' comments; values may be quoted."""
    env: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name = name.strip().removeprefix("export ").strip()
        if not eq or not name.isidentifier():
            raise ProfileError(f"{path}:{lineno}: expected NAME=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name] = value
    return env


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # unpopulated GID entries answer EINVAL in real sysfs
        return None


def _roce_v2_gid_index(port: Path) -> int | None:
    """First RoCE v2 GID of a port, preferring IPv4-mapped ones (routable; what NCCL wants)."""
    types_dir = port / "gid_attrs" / "types"
    if not types_dir.is_dir():
        return None
    v2: list[tuple[int, str | None]] = []
    for entry in types_dir.iterdir():
        if not entry.name.isdigit():
            continue
        if (_read(entry) or "").lower() == "roce v2":
            v2.append((int(entry.name), _read(port / "gids" / entry.name)))
    v2.sort()
    populated = [(i, gid) for i, gid in v2 if gid is None or gid.replace(":", "").strip("0")]
    ipv4 = [i for i, gid in populated if gid and gid.lower().startswith("0000:0000:0000:0000:0000:ffff:")]
    if ipv4:
        return ipv4[0]
    return populated[0][0] if populated else None


def detect(sysfs_root: str | Path = "/sys") -> Detection:
    """Which fabric this host has, from sysfs. Ports reported not ACTIVE are ignored."""
    ib_root = Path(sysfs_root) / "class" / "infiniband"
    if not ib_root.is_dir() or not any(ib_root.iterdir()):
        return Detection("ethernet", f"no RDMA devices in {ib_root}")
    ib_devs: list[str] = []
    roce_devs: list[str] = []
    gid_index: int | None = None
    for dev in sorted(ib_root.iterdir()):
        ports = dev / "ports"
        if not ports.is_dir():
            continue
        for port in sorted(ports.iterdir(), key=lambda p: p.name):
            state = _read(port / "state")
            if state is not None and "ACTIVE" not in state.upper():
                continue
            layer = (_read(port / "link_layer") or "").lower()
            if layer == "infiniband":
                ib_devs.append(dev.name)
            elif layer == "ethernet":
                roce_devs.append(dev.name)
                if gid_index is None:
                    gid_index = _roce_v2_gid_index(port)
    if ib_devs:
        return Detection("infiniband", f"InfiniBand link layer on {', '.join(sorted(set(ib_devs)))}",
                         tuple(sorted(set(ib_devs))))
    if roce_devs:
        devs = tuple(sorted(set(roce_devs)))
        where = f"RoCE (Ethernet link layer) on {', '.join(devs)}"
        if gid_index is None:
            return Detection("roce", f"{where}; no RoCE v2 GID found, keeping the profile's GID index", devs)
        return Detection("roce", f"{where}; first RoCE v2 GID index {gid_index}", devs, gid_index)
    return Detection("ethernet", f"RDMA devices in {ib_root} but no ACTIVE port")


def resolve(name: str, sysfs_root: str | Path = "/sys") -> NetProfile:
    """The profile's variables; for `auto`, the detected profile with the detected GID index."""
    if name == "auto":
        found = detect(sysfs_root)
        env = read_env_file(profile_path(found.profile))
        if found.gid_index is not None:
            env["NCCL_IB_GID_INDEX"] = str(found.gid_index)
        return NetProfile(found.profile, f"auto: {found.reason}", env)
    if name not in PROFILES:
        raise ProfileError(f"unknown NCCL profile {name!r}; known: auto, {', '.join(PROFILES)}")
    return NetProfile(name, "FLEET_NET_PROFILE", read_env_file(profile_path(name)))


def _ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _ipv6_interfaces(proc_root: Path) -> dict[str, str]:
    """address -> interface from /proc/net/if_inet6 (address hex, index, prefix, scope, flags, name)."""
    out: dict[str, str] = {}
    text = _read(proc_root / "net" / "if_inet6") or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6:
            addr = ipaddress.IPv6Address(int(parts[0], 16))
            out[str(addr)] = parts[5]
    return out


def interface_for(addr: str, proc_root: str | Path = "/proc") -> str | None:
    """Name of the local interface that holds `addr`, or None when no interface does."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(addr))
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address):
        return _ipv6_interfaces(Path(proc_root)).get(str(ip))
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == str(ip):
            return name
    return None


def resolve_advertise_addr(cfg: "FleetConfig") -> str:
    """FLEET_ADVERTISE_ADDR, else the source address of the route toward Consul.

    connect() on a UDP socket only picks a route and a source address; it sends nothing.
    """
    if cfg.advertise_addr:
        return cfg.advertise_addr
    host, port = cfg.consul.host_port
    host = host.strip("[]")  # [::1]:8500
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


__all__ = ["PROFILES", "Detection", "NetProfile", "ProfileError", "detect", "resolve", "interface_for",
           "read_env_file", "profile_path", "resolve_advertise_addr"]
