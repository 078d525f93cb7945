"""Consul ACL rights: the policies a node, a router and `status` need, and the preflight that checks them.

The shipped policies (data/acl/<role>.hcl, shipped.py) are the single list of rights: `acl-policy` renders them
for an operator to create, and the preflight asks Consul's own ACL resolver whether the configured token
holds each rule of the rendered policy, before anything starts. A missing right is a configuration
error (exit 78) naming the variable the token came from and every right it lacks (docs/security.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sglang_fleet import consul_api as ca
from sglang_fleet import shipped

POLICIES = ("node", "router", "status")
# One rule per block, as the shipped files write them: key_prefix "x/" { policy = "write" }
RULE_RE = re.compile(r'(\w+)\s+"([^"]*)"\s*\{\s*policy\s*=\s*"(\w+)"\s*\}')


@dataclass(frozen=True)
class Rule:
    kind: str  # key_prefix, service, session, node_prefix, ...
    segment: str
    access: str  # read, write, list

    @property
    def resource(self) -> str:
        return self.kind.removesuffix("_prefix")

    def __str__(self) -> str:
        return f'{self.resource}:{self.access} on "{self.segment}"' + (" (prefix)" if self.kind.endswith("_prefix")
                                                                       else "")


def policy_path(role: str) -> Path:
    path = shipped.find(shipped.ACL_POLICIES, role)
    if path is None:
        raise FileNotFoundError(f"no ACL policy {role}.hcl in {shipped.searched(shipped.ACL_POLICIES)}")
    return path


def render_policy(role: str, cluster: str, consul_node: str) -> str:
    """The policy file with its placeholders filled in, as `consul acl policy create -rules` takes it."""
    text = policy_path(role).read_text()
    return text.replace("${cluster}", cluster).replace("${consul_node}", consul_node)


def rules(policy_text: str) -> list[Rule]:
    # Only rule lines: the comments mention placeholders and commands, never a quoted rule.
    body = "\n".join(line for line in policy_text.splitlines() if not line.lstrip().startswith("#"))
    return [Rule(*m.groups()) for m in RULE_RE.finditer(body)]


def missing_rights(api: ca.ConsulAPI, role: str, cluster: str) -> list[str] | None:
    """The rights of `role`'s policy this token lacks; None when this Consul cannot tell.

    Session rules name the Consul agent's node, which a token without agent:read cannot learn: they are
    checked by creating (and destroying) a session instead, which is what a node does next anyway."""
    wanted = rules(render_policy(role, cluster, "${consul_node}"))
    asked = [r for r in wanted if r.resource != "session"]
    allowed = api.authorize([(r.resource, r.segment, r.access) for r in asked])
    if allowed is None:
        return None
    lacking = [str(r) for r, ok in zip(asked, allowed) if not ok]
    if any(r.resource == "session" for r in wanted):
        try:
            api.session_destroy(api.session_create("sglang-fleet-preflight", [], behavior="delete"))
        except ca.ConsulDenied as exc:
            lacking.append(exc.right)
    return lacking


def preflight(api: ca.ConsulAPI, role: str, cluster: str) -> None:
    """Raises ConsulDenied naming every right `role` lacks. A Consul that is down or cannot tell passes:
    the node waits for Consul as always, and a 403 later is still a configuration error."""
    try:
        lacking = missing_rights(api, role, cluster)
    except ca.ConsulUnavailable:
        return
    if lacking:
        who = api.settings.token_source if api.settings.token else "no CONSUL_HTTP_TOKEN is set and the anonymous token"
        raise ca.ConsulDenied(f"{who} lacks {'; '.join(lacking)} (`sglang-fleet acl-policy {role}` prints what a "
                              f"{role} needs; docs/security.md)", right=lacking[0])


__all__ = ["POLICIES", "Rule", "missing_rights", "policy_path", "preflight", "render_policy", "rules"]
