"""smg_process.py: smg's command line and environment."""
from __future__ import annotations

from sglang_fleet.config import load_config
from sglang_fleet.plan import redact_argv
from sglang_fleet.smg_process import smg_argv, smg_env


def test_smg_argv_pd_with_key_and_extra_args():
    cfg = load_config({"FLEET_ROLE": "router", "FLEET_ROUTER_PORT": "8100", "FLEET_ROUTER_HOST": "127.0.0.1",
                       "FLEET_ROUTER_POLICY": "round_robin", "FLEET_ROUTER_API_KEY": "k",
                       "FLEET_ROUTER_PROMETHEUS_PORT": "29100", "FLEET_ROUTER_HEALTH_INTERVAL": "7",
                       "FLEET_ROUTER_BREAKER_OPEN": "4",
                       "FLEET_ROUTER_ARGS": "--request-timeout-secs 600 --disable-retries"})
    argv = smg_argv(cfg, "pd", "/x/smg", "adm1n")
    assert argv[:2] == ["/x/smg", "launch"]
    text = " ".join(argv)
    for part in ("--host 127.0.0.1", "--port 8100", "--policy round_robin", "--prometheus-port 29100",
                 "--health-check-interval-secs 7", "--cb-timeout-duration-secs 4", "--pd-disaggregation",
                 "--api-key k", "--control-plane-api-keys sglang-fleet:sglang-fleet router agent:admin:adm1n",
                 # aligned with SGLang's /health (up to 20 s) and smg's own drain before the agent's SIGKILL
                 "--health-check-timeout-secs 20", "--shutdown-grace-period-secs 30"):
        assert part in text
    assert argv[-3:] == ["--request-timeout-secs", "600", "--disable-retries"]
    assert "--pd-disaggregation" not in smg_argv(cfg, "regular", "smg", "adm1n")
    assert "--tls-cert-path" not in text


def test_smg_argv_with_tls_and_the_engine_key_as_client_key(tmp_path):
    cert, key = tmp_path / "r.pem", tmp_path / "r-key.pem"
    cert.write_text("x")
    key.write_text("x")
    cfg = load_config({"FLEET_ROLE": "router", "FLEET_ENGINE_API_KEY": "ek", "FLEET_ROUTER_TLS_CERT": str(cert),
                       "FLEET_ROUTER_TLS_KEY": str(key)})
    argv = smg_argv(cfg, "regular", "smg", "adm1n")
    text = " ".join(argv)
    assert f"--tls-cert-path {cert} --tls-key-path {key}" in text
    assert "--api-key ek" in text  # FLEET_ROUTER_API_KEY defaults to the engines' key
    shown = redact_argv(argv)
    assert not {"ek", "adm1n"} & set(" ".join(shown).replace(":", " ").split())


def test_smg_env_drops_our_settings_and_secrets():
    env = smg_env({"PATH": "/bin", "FLEET_ROUTER_API_KEY": "k", "CONSUL_HTTP_TOKEN": "t", "HOME": "/root"})
    assert env["PATH"] == "/bin" and env["HOME"] == "/root"
    assert "FLEET_ROUTER_API_KEY" not in env and "CONSUL_HTTP_TOKEN" not in env
