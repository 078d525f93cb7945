"""Chaos tier: Consul outages under a serving fleet (tests/fleet_chaos.py has the scenarios, tests/consul_cluster.py
the real Consul cluster; the fixtures are in tests/conftest.py)."""
