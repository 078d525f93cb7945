"""The shipped ACL policies: what each role is granted, rendered for one cluster and one agent node."""
from __future__ import annotations

from sglang_fleet import access
from sglang_fleet.access import Rule


def test_node_policy_grants_only_its_cluster_prefix_its_services_and_its_agent_sessions():
    rules = access.rules(access.render_policy("node", "prod", "gpu-host-07"))
    assert rules == [Rule("key_prefix", "sglang-fleet/prod/", "write"),
                     Rule("service", "sglang-fleet-member", "write"),
                     Rule("service", "sglang", "write"),
                     Rule("session", "gpu-host-07", "write")]


def test_router_policy_reads_the_serving_services_and_writes_only_its_own():
    assert access.rules(access.render_policy("router", "prod", "r1")) == [
        Rule("service", "sglang", "read"), Rule("node_prefix", "", "read"), Rule("service", "sglang-router", "write")]


def test_status_policy_is_read_only():
    rules = access.rules(access.render_policy("status", "prod", "x"))
    assert {r.access for r in rules} == {"read"}
    assert Rule("key_prefix", "sglang-fleet/prod/", "read") in rules


def test_rendered_policies_keep_no_placeholder_and_rules_ignore_comments():
    for role in access.POLICIES:
        text = access.render_policy(role, "c", "n")
        assert "${" not in text
    assert access.rules('# key_prefix "x/" { policy = "write" }\nservice "a" {\n  policy = "read"\n}\n') == [
        Rule("service", "a", "read")]


def test_rule_names_the_right_as_errors_do():
    assert str(Rule("key_prefix", "sglang-fleet/prod/", "write")) == 'key:write on "sglang-fleet/prod/" (prefix)'
    assert str(Rule("service", "sglang", "read")) == 'service:read on "sglang"'
