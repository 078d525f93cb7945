"""Integration tier: a real Consul agent and real smg on loopback, node supervisors as real processes
running the sim engine. Its fixtures are shared with the real-engine tier and live in tests/conftest.py
(harness: tests/fleet_processes.py)."""
