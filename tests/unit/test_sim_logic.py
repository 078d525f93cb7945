"""Pure parts of the sim engine: argv and knobs, the hello check, generated text, request shapes, KV rooms."""
from __future__ import annotations

import signal
import threading

import pytest
import structlog
from structlog.testing import capture_logs

from sglang_fleet import sim_engine, sim_group, sim_http, sim_kv
from sglang_fleet.sim_engine import SimArgError, parse_args

GUIDE_ARGV = [
    "--model-path", "meta-llama/Meta-Llama-3.1-405B-Instruct", "--tp", "16", "--dist-init-addr", "172.16.4.52:20000",
    "--nnodes", "2", "--node-rank", "1", "--host", "0.0.0.0", "--port", "40000",
    "--mem-fraction-static", "0.85", "--enable-torch-compile", "--trust-remote-code",
]


def test_sglang_argv_is_parsed_and_unknown_flags_are_ignored():
    a = parse_args(GUIDE_ARGV, env={})
    assert (a.model_path, a.tp_size, a.nnodes, a.node_rank) == ("meta-llama/Meta-Llama-3.1-405B-Instruct", 16, 2, 1)
    assert a.dist_init == ("172.16.4.52", 20000)
    assert (a.host, a.port, a.served_model_name) == ("0.0.0.0", 40000, a.model_path)
    assert "--mem-fraction-static" in a.ignored and "--enable-torch-compile" in a.ignored
    assert (a.disaggregation_mode, a.startup_delay, a.join_timeout) == ("null", 0.0, sim_engine.DEFAULT_JOIN_TIMEOUT_S)


def test_pd_flags_and_served_model_name():
    a = parse_args(["--model", "m", "--served-model-name", "alias", "--disaggregation-mode", "prefill",
                    "--disaggregation-bootstrap-port", "9001", "--dist-timeout", "30"], env={})
    assert (a.model_path, a.served_model_name, a.disaggregation_mode, a.bootstrap_port) == ("m", "alias", "prefill", 9001)
    assert a.join_timeout == 30


@pytest.mark.parametrize("env, flag, expected", [
    ({}, [], 0.0),
    ({"SGLANG_FLEET_SIM_STARTUP_DELAY": "2.5"}, [], 2.5),
    ({"FLEET_SIM_STARTUP_DELAY": "1"}, [], 1.0),  # what launch.py passes
    ({"SGLANG_FLEET_SIM_STARTUP_DELAY": "3", "FLEET_SIM_STARTUP_DELAY": "1"}, [], 3.0),
    ({"SGLANG_FLEET_SIM_STARTUP_DELAY": "3"}, ["--sim-startup-delay", "0.25"], 0.25),
])
def test_startup_delay_sources(env, flag, expected):
    assert parse_args(flag, env=env).startup_delay == expected


@pytest.mark.parametrize("argv, env, message", [
    (["--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], {}, "--node-rank 2 is out of range 0..1"),
    (["--nnodes", "2", "--node-rank", "1"], {}, "needs --dist-init-addr"),
    (["--nnodes", "2", "--dist-init-addr", "nohostport"], {}, "is not host:port"),
    (["--nnodes", "0"], {}, "--nnodes 0 must be >= 1"),
    (["--disaggregation-mode", "encode"], {}, "allowed null, prefill, decode"),
    (["--port", "abc"], {}, "invalid int value"),
    ([], {"SGLANG_FLEET_SIM_STARTUP_DELAY": "soon"}, "SGLANG_FLEET_SIM_STARTUP_DELAY='soon' is not a number"),
    ([], {"SGLANG_FLEET_SIM_TOKEN_DELAY": "-1"}, "must be >= 0"),
])
def test_bad_argv_is_one_clear_error(argv, env, message):
    with pytest.raises(SimArgError, match=None) as err:
        parse_args(argv, env=env)
    assert message in str(err.value)


def test_main_exits_78_on_bad_argv(capsys):
    assert sim_engine.main(["--nnodes", "2", "--node-rank", "5", "--dist-init-addr", "h:1"]) == 78
    assert "--node-rank 5 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("value, crash", [("1", True), ("true", True), ("0", False), ("", False)])
def test_crash_knob(value, crash):
    assert sim_engine.crash_requested({"SGLANG_FLEET_SIM_CRASH_AT_START": value}) is crash


def test_split_host_port():
    assert sim_engine.split_host_port("10.0.0.1:5000") == ("10.0.0.1", 5000)
    assert sim_engine.split_host_port("[fd00::1]:5000") == ("fd00::1", 5000)
    for bad in ("host", ":5000", "host:0", "host:x"):
        with pytest.raises(SimArgError):
            sim_engine.split_host_port(bad)


def hello(**kw):
    return {"type": "hello", "rank": 1, "nnodes": 3, "model": "m", **kw}


@pytest.mark.parametrize("msg, taken, reason", [
    (hello(), {}, None),
    (hello(rank=2), {1: "a:1"}, None),
    (hello(), {1: "10.0.0.2:4000"}, "rank 1 is already held by 10.0.0.2:4000"),
    (hello(rank=0), {}, "--node-rank 0 is out of range 1..2"),
    (hello(rank=3), {}, "--node-rank 3 is out of range 1..2"),
    (hello(nnodes=2), {}, "--nnodes 2 differs from rank 0's --nnodes 3"),
    (hello(model="other"), {}, "--model-path 'other' differs from rank 0's 'm'"),
    ({"type": "ping"}, {}, "expected a hello"),
])
def test_check_hello(msg, taken, reason):
    got = sim_group.check_hello(msg, nnodes=3, model="m", taken=taken)
    assert got == reason if reason is None else reason in got


def test_generated_text_says_it_is_the_sim():
    pieces, finish = sim_http.sim_pieces("one two three", 16)
    assert "".join(pieces) == "[sglang-fleet sim engine] one two three" and finish == "stop"
    pieces, finish = sim_http.sim_pieces("one two three", 2)
    assert pieces == ["[sglang-fleet sim engine]", " one"] and finish == "length"
    assert sim_http.sim_pieces("", 0) == (["[sglang-fleet sim engine]"], "stop")


def test_chat_prompt_and_batch_fields():
    assert sim_http.chat_prompt([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]) == "hi"
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "b"}]
    assert sim_http.chat_prompt([{"role": "user", "content": parts}]) == "a  b"
    with pytest.raises(sim_http.HTTPError):
        sim_http.chat_prompt([])
    assert sim_http.pick([7, 8], 1) == 8 and sim_http.pick([7], 3) is None and sim_http.pick(5, 2) == 5
    assert sim_http.sse({"a": 1}) == b'data: {"a": 1}\n\n' and sim_http.sse(b"[DONE]") == b"data: [DONE]\n\n"


def test_v1_models_is_owned_by_sglang_so_smg_detects_the_runtime():
    a = parse_args(["--model-path", "m", "--served-model-name", "s"], env={})
    entry = sim_http.models_list(a, 0)["data"][0]
    assert (entry["id"], entry["owned_by"], entry["root"], entry["sim"]) == ("s", "sglang", "m", True)
    assert sim_http.model_info(a)["is_generation"] is True


def test_kv_rooms_wait_for_the_prefill_and_hand_over_once():
    rooms = sim_kv.KVRooms(max_rooms=2)
    got = {}
    t = threading.Thread(target=lambda: got.update(blob=rooms.take(42, wait=5)))
    t.start()  # the decode asks first; the prefill stores a moment later
    rooms.put(42, {"kv": sim_kv.kv_digest("p")})
    t.join(5)
    assert got["blob"] == {"kv": sim_kv.kv_digest("p")} and rooms.transfers == 1
    assert rooms.take(42, wait=0) is None  # taken once
    for room in (1, 2, 3):
        rooms.put(room, {"kv": "x"})
    assert rooms.stored() == 2 and rooms.take(1, wait=0) is None  # oldest dropped


def test_stop_signal_never_waits_on_another_thread_and_exits_0():
    """The handler only records the signal: a thread failing at the same moment (holding the lock) cannot
    block it, and the stop is logged by the main thread afterwards."""
    engine = sim_engine.SimEngine(parse_args([], env={}), structlog.get_logger("sim"))
    with engine._lock:  # e.g. fail() running in a group-connection thread
        handler = threading.Thread(target=engine._on_signal, args=(signal.SIGTERM, None), daemon=True)
        handler.start()
        handler.join(2.0)
        assert not handler.is_alive()
    with capture_logs() as logs:
        assert engine._finish() == 0
    assert [e["event"] for e in logs] == ["sim engine stopping on SIGTERM"]


@pytest.mark.parametrize("path, header, api_key, admin_key, allowed", [
    ("/generate", None, None, None, True),  # no keys: open, as SGLang without --api-key
    ("/generate", None, "k", None, False),
    ("/generate", "Bearer k", "k", None, True),
    ("/generate", "bearer k", "k", None, True),
    ("/generate", "Bearer x", "k", None, False),
    ("/generate", "k", "k", None, False),  # not a bearer header
    ("/health", None, "k", "a", True),  # probes never need a key
    ("/health_generate", None, "k", None, True),
    ("/metrics", None, "k", None, True),
    ("/flush_cache", "Bearer k", "k", "a", False),  # ADMIN_OPTIONAL: the admin key when there is one
    ("/flush_cache", "Bearer a", "k", "a", True),
    ("/flush_cache", "Bearer k", "k", None, True),
    ("/v1/models", "Bearer a", "k", "a", False),  # NORMAL routes take only the API key
])
def test_api_keys_are_checked_as_sglang_does(path, header, api_key, admin_key, allowed):
    assert sim_http.authorized(path, header, api_key, admin_key) is allowed


def test_api_keys_come_from_flags_or_a_config_file_and_flags_win(tmp_path):
    conf = tmp_path / "engine.yaml"
    conf.write_text("api-key: from-file\nadmin_api_key: admin-from-file\nmem-fraction-static: 0.8\n")
    args = parse_args(["--model-path", "m", "--config", str(conf)], env={})
    assert (args.api_key, args.admin_api_key) == ("from-file", "admin-from-file")
    args = parse_args(["--model-path", "m", "--config", str(conf), "--api-key", "flag"], env={})
    assert (args.api_key, args.admin_api_key) == ("flag", "admin-from-file")
    assert "from-file" not in repr(args)
