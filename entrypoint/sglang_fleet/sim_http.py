"""HTTP surface of the sim engine: what the router (smg) and users touch on a SGLang server.

Rank 0 (EngineHandler): /health /health_generate /ready (503 until ready), /server_info /get_server_info,
/model_info /get_model_info, /v1/models, /metrics, /v1/loads (SGLang 0.5.23's shape) and /get_load (older
SGLang's), both counting the requests being served, POST /generate, /v1/completions,
/v1/chat/completions (stream: SSE `data: {...}` lines ending with `data: [DONE]`, chunked encoding).
Ranks > 0 (DummyHealthHandler): /health and /health_generate, always 200, like SGLang 0.5.x.
/version is deliberately absent: smg takes a worker answering /version for vLLM.
Every answer says it comes from the sim: "sim": true, and generated text starts with SIM_PREFIX.
With --api-key / --admin-api-key, rank 0 asks for `Authorization: Bearer <key>` as SGLang 0.5.23 does
(srt/utils/auth.py decide_request_auth): /health*, /ready* and /metrics* never; /flush_cache takes the
admin key when there is one (ADMIN_OPTIONAL); every other route the API key; 401 {"error": "Unauthorized"}.
"""
from __future__ import annotations

import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import AF_INET6
from urllib.parse import parse_qs

from sglang_fleet import __version__, sim_kv

SIM_PREFIX = "[sglang-fleet sim engine]"


class HTTPError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Output:
    pieces: list[str]
    prompt_tokens: int
    finish_reason: str
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def sim_pieces(prompt: str, max_tokens: int) -> tuple[list[str], str]:
    """The 'generated tokens': the sim's banner, then the prompt's words echoed, max_tokens in all."""
    words = prompt.split()
    budget = max(1, max_tokens) - 1
    return [SIM_PREFIX] + [" " + w for w in words[:budget]], ("stop" if len(words) <= budget else "length")


def chat_prompt(messages) -> str:
    """The text the sim echoes for a chat: the last message's text (string or OpenAI content parts)."""
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages must be a non-empty list")
    content = (messages[-1] or {}).get("content") if isinstance(messages[-1], dict) else None
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def pick(value, index: int):
    """A per-request field of a batch: the index-th element of a list, else the value itself."""
    return (value[index] if index < len(value) else None) if isinstance(value, list) else value


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def server_info(engine, srv) -> dict:
    a = engine.args
    kv = engine.kv
    return {
        "sim": True, "sim_engine": "CPU stand-in for sglang.launch_server, not a model",
        "version": f"sglang-fleet-sim-{__version__}", "model_path": a.model_path,
        "served_model_name": a.served_model_name, "tokenizer_path": a.model_path,
        "host": a.host, "port": a.port, "nnodes": a.nnodes, "node_rank": a.node_rank,
        "dist_init_addr": a.dist_init_addr, "tp_size": a.tp_size, "dp_size": a.dp_size, "pp_size": a.pp_size,
        "disaggregation_mode": a.disaggregation_mode, "disaggregation_bootstrap_port": a.bootstrap_port,
        "disaggregation_transfer_backend": a.transfer_backend, "context_length": a.context_length,
        "max_total_tokens": 65536, "max_running_requests": 256, "ready": engine.ready.is_set(),
        "uptime_s": round(time.time() - engine.started_at, 3), "requests": srv.requests,
        "inflight": srv.inflight, "kv_transfers": kv.transfers if kv else 0,
        "kv_rooms_stored": kv.stored() if kv else 0,
    }


def loads(engine, srv, query: str) -> dict:
    """GET /v1/loads as SGLang 0.5.23 answers it (entrypoints/v1_loads.py), one DP rank; `num_running_reqs`
    counts the requests this sim is serving right now (the node supervisor drains on it)."""
    a = engine.args
    now = time.time()
    include = {s for part in parse_qs(query).get("include", []) for s in part.split(",") if s}
    load = {"timestamp": now, "dp_rank": 0, "num_running_reqs": srv.inflight, "num_waiting_reqs": 0,
            "num_used_tokens": 0, "num_total_tokens": 0, "max_total_num_tokens": 65536,
            "max_running_requests": 256, "token_usage": 0.0, "gen_throughput": 0.0, "utilization": 0.0}
    if a.disaggregation_mode != "null" and (not include or include & {"disagg", "all"}):
        load["disaggregation"] = {"mode": a.disaggregation_mode, "prefill_bootstrap_queue_reqs": 0,
                                  "prefill_inflight_queue_reqs": 0, "decode_prealloc_queue_reqs": 0,
                                  "decode_transfer_queue_reqs": 0, "decode_retracted_queue_reqs": 0}
    return {"timestamp": datetime.fromtimestamp(now, timezone.utc).isoformat(),
            "version": f"sglang-fleet-sim-{__version__}", "accelerator": None, "num_accelerators": 0,
            "loads": [load], "sim": True}


def model_info(a) -> dict:
    return {"model_path": a.model_path, "tokenizer_path": a.model_path, "served_model_name": a.served_model_name,
            "disaggregation_mode": a.disaggregation_mode, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": "default", "has_image_understanding": False,
            "has_audio_understanding": False, "model_type": "sim", "architectures": ["SimEngine"], "sim": True}


def models_list(a, created: float) -> dict:
    return {"object": "list", "data": [{
        "id": a.served_model_name, "object": "model", "created": int(created),
        "owned_by": "sglang", "root": a.model_path, "parent": None, "max_model_len": a.context_length,
        "sim": True}]}


class SimHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, engine):
        if ":" in addr[0]:
            self.address_family = AF_INET6
        self.engine = engine
        self.requests = 0
        self.inflight = 0
        self.lock = threading.Lock()
        super().__init__(addr, handler)


def serve(engine, host: str, port: int, handler) -> SimHTTPServer:
    srv = SimHTTPServer((host, port), handler, engine)
    threading.Thread(target=srv.serve_forever, daemon=True, name=f"sim-http-{port}").start()
    return srv


class _Base(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sglang-fleet-sim"
    timeout = 300  # an idle keep-alive connection is closed after this

    def log_message(self, *_args):  # the router polls often; generation requests are logged instead
        pass

    def send_body(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, code: int, obj) -> None:
        self.send_body(code, json.dumps(obj).encode())

    def send_error_json(self, code: int, message: str) -> None:
        kind = {400: "BadRequestError", 404: "NotFoundError",
                503: "ServiceUnavailableError"}.get(code, "InternalServerError")
        self.send_json(code, {"object": "error", "message": message, "type": kind, "param": None, "code": code,
                              "error": {"message": message, "type": kind, "code": code}, "sim": True})


ADMIN_OPTIONAL_PATHS = ("/flush_cache",)  # the ones the sim serves of SGLang's @auth_level(ADMIN_OPTIONAL)


def authorized(path: str, header: str | None, api_key: str | None, admin_api_key: str | None) -> bool:
    """SGLang 0.5.23's decide_request_auth for the routes the sim serves (NORMAL and ADMIN_OPTIONAL)."""
    if path.startswith(("/health", "/ready", "/metrics")):
        return True
    scheme, _, token = (header or "").partition(" ")
    key = admin_api_key if path in ADMIN_OPTIONAL_PATHS and admin_api_key else api_key
    if not key:
        return True
    return scheme.lower() == "bearer" and hmac.compare_digest(token, key)


def metrics_text(server, kv_transfers: int = 0) -> bytes:
    return (f"# sglang-fleet sim engine, not a model\nsglang:num_running_reqs {server.inflight}\n"
            f"sglang:num_queue_reqs 0\nsglang_fleet_sim_requests_total {server.requests}\n"
            f"sglang_fleet_sim_kv_transfers_total {kv_transfers}\n").encode()


class DummyHealthHandler(_Base):
    """SGLang 0.5.23's dummy health server of ranks > 0 (srt/utils/common.py:3624): /health,
    /health_generate and /ping answer 200, /metrics only with --enable-metrics, the rest 404."""

    def do_GET(self):
        path = self.path.split("?")[0]
        if path in ("/health", "/health_generate", "/ping"):
            self.send_body(200, b"", "text/plain")
        elif path == "/metrics" and self.server.engine.args.enable_metrics:
            self.send_body(200, metrics_text(self.server), "text/plain; version=0.0.4")
        else:
            self.send_error_json(404, f"{self.path}: ranks > 0 serve only /health (sim engine)")

    def do_POST(self):
        self.send_error_json(404, f"{self.path}: ranks > 0 serve only /health (sim engine)")


class EngineHandler(_Base):
    @property
    def engine(self):
        return self.server.engine

    def _refused(self, path: str) -> bool:
        """Answers 401 as SGLang does when the request lacks the key its route wants."""
        a = self.engine.args
        if authorized(path, self.headers.get("Authorization"), a.api_key, a.admin_api_key):
            return False
        self.send_json(401, {"error": "Unauthorized"})
        return True

    # -- GET -------------------------------------------------------------------------------
    def do_GET(self):
        path, _, query = self.path.partition("?")
        e = self.engine
        if self._refused(path):
            return
        if path in ("/health", "/health_generate", "/ready"):
            if e.ready.is_set():
                self.send_body(200, b"", "text/plain")
            else:
                self.send_body(503, b"sim engine: loading or waiting for peers", "text/plain")
        elif path in ("/server_info", "/get_server_info"):
            self.send_json(200, server_info(e, self.server))
        elif path in ("/model_info", "/get_model_info"):
            self.send_json(200, model_info(e.args))
        elif path == "/v1/models":
            self.send_json(200, models_list(e.args, e.started_at))
        elif path == "/v1/loads":
            self.send_json(200, loads(e, self.server, query))
        elif path == "/get_load":
            self.send_json(200, [{"dp_rank": 0, "num_reqs": self.server.inflight, "num_waiting_reqs": 0,
                                  "num_tokens": 0, "sim": True}])
        elif path == "/metrics" and e.args.enable_metrics:  # SGLang serves it only with --enable-metrics
            self.send_body(200, metrics_text(self.server, e.kv.transfers if e.kv else 0), "text/plain; version=0.0.4")
        elif path == "/flush_cache":  # SGLang 0.5.23 takes GET and POST
            self.send_body(200, b"sim engine: nothing cached", "text/plain")
        else:
            self.send_error_json(404, f"{path}: not served by the sim engine")

    # -- POST ------------------------------------------------------------------------------
    def do_POST(self):
        path = self.path.split("?")[0]
        routes = {"/generate": self._generate, "/v1/completions": self._completions,
                  "/v1/chat/completions": self._chat}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self._refused(path):
            return
        if path == "/flush_cache":
            return self.send_body(200, b"sim engine: nothing cached", "text/plain")
        if path not in routes:
            return self.send_error_json(404, f"{path}: not served by the sim engine")
        srv = self.server
        with srv.lock:
            srv.requests += 1
            srv.inflight += 1
        try:
            if not self.engine.ready.is_set():
                raise HTTPError(503, "sim engine is not ready (loading or waiting for peers)")
            try:
                body = json.loads(raw or b"{}")
            except ValueError as exc:
                raise HTTPError(400, f"request body is not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "request body must be a JSON object")
            routes[path](body)
        except HTTPError as exc:
            self.send_error_json(exc.code, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a field of the wrong shape
            self.send_error_json(400, f"bad request for {path}: {exc!r}")
        finally:
            with srv.lock:
                srv.inflight -= 1

    def _produce(self, body: dict, prompt: str, index: int, max_tokens: int) -> Output:
        pieces, finish = sim_pieces(prompt, max_tokens)
        out = Output(pieces, len(prompt.split()), finish, {"sim": True})
        a, kv = self.engine.args, self.engine.kv
        if a.disaggregation_mode == "null":
            return out
        room = pick(body.get("bootstrap_room"), index)
        host, port = pick(body.get("bootstrap_host"), index), pick(body.get("bootstrap_port"), index)
        if room is None:
            raise HTTPError(400, f"a {a.disaggregation_mode} server needs bootstrap_room "
                                 "(send it through a PD router)")
        digest = sim_kv.kv_digest(prompt)
        if a.disaggregation_mode == "prefill":
            kv.put(int(room), {"kv": digest, "prompt_tokens": out.prompt_tokens})
            out.meta.update(bootstrap_room=room, kv_stored=digest)
            return out
        if host is None or port is None:
            raise HTTPError(400, "a decode server needs bootstrap_host and bootstrap_port")
        try:
            reply = sim_kv.fetch(str(host), int(port), int(room))
        except sim_kv.KVFetchError as exc:
            raise HTTPError(500, f"sim decode: {exc}") from None
        if reply["kv"] != digest:
            raise HTTPError(500, f"sim decode: KV of room {room} from {host}:{port} is for another prompt")
        kv.count_fetch()
        out.meta.update(kv_from=f"{host}:{port}", bootstrap_room=room, kv=digest)
        self.engine.log.info("decode fetched KV", bootstrap_room=room, kv_from=f"{host}:{port}")
        return out

    def _pace(self, pieces: int) -> None:
        delay = self.engine.args.token_delay
        if delay:
            time.sleep(delay * pieces)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def _stream(self, events) -> None:
        self._start_stream()
        for event in events:
            self._chunk(sse(event))
        self._chunk(sse(b"[DONE]"))
        self.wfile.write(b"0\r\n\r\n")

    # SGLang's native API: {"text", "output_ids", "meta_info"}; a list of prompts answers a list.
    def _generate(self, body: dict) -> None:
        text = body.get("text")
        if text is None and body.get("input_ids") is not None:
            ids = body["input_ids"]
            text = [" ".join(map(str, x)) for x in ids] if ids and isinstance(ids[0], list) else " ".join(map(str, ids))
        if text is None:
            raise HTTPError(400, "/generate needs text or input_ids")
        batch = isinstance(text, list)
        prompts = [str(t) for t in text] if batch else [str(text)]
        rid = body.get("rid") or uuid.uuid4().hex
        started = time.time()
        outs = []
        for i, prompt in enumerate(prompts):
            params = pick(body.get("sampling_params"), i) or {}
            outs.append(self._produce(body, prompt, i, int(params.get("max_new_tokens") or 128)))

        def meta(o: Output, k: int, i: int) -> dict:
            done = k == len(o.pieces)
            return {"id": pick(rid, i) if batch else rid, "prompt_tokens": o.prompt_tokens, "completion_tokens": k,
                    "cached_tokens": 0, "e2e_latency": round(time.time() - started, 6),
                    "finish_reason": {"type": o.finish_reason} if done else None, **o.meta}

        if body.get("stream"):
            if batch:
                raise HTTPError(400, "the sim engine streams one prompt at a time")
            o = outs[0]

            def events():
                for k in range(1, len(o.pieces) + 1):
                    self._pace(1)
                    yield {"text": "".join(o.pieces[:k]), "output_ids": list(range(k)), "meta_info": meta(o, k, 0)}
            return self._stream(events())
        self._pace(max(len(o.pieces) for o in outs))
        results = [{"text": o.text, "output_ids": list(range(len(o.pieces))), "meta_info": meta(o, len(o.pieces), i)}
                   for i, o in enumerate(outs)]
        self.engine.log.info("generate", rid=rid, prompts=len(outs), **outs[0].meta)
        self.send_json(200, results if batch else results[0])

    # OpenAI: /v1/completions and /v1/chat/completions, the shapes the `openai` client accepts.
    def _openai(self, body: dict, prompts: list[str], max_tokens: int, chat: bool) -> None:
        outs = [self._produce(body, p, i, max_tokens) for i, p in enumerate(prompts)]
        model = body.get("model") or self.engine.args.served_model_name
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": model, "sim": True, "sim_meta": outs[0].meta}
        usage = {"prompt_tokens": sum(o.prompt_tokens for o in outs),
                 "completion_tokens": sum(len(o.pieces) for o in outs)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.engine.log.info("chat completion" if chat else "completion", prompts=len(outs), **outs[0].meta)
        if not body.get("stream"):
            self._pace(max(len(o.pieces) for o in outs))
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                            "finish_reason": o.finish_reason} for i, o in enumerate(outs)]
            else:
                choices = [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                           for i, o in enumerate(outs)]
            obj = "chat.completion" if chat else "text_completion"
            return self.send_json(200, {**head, "object": obj, "choices": choices, "usage": usage})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion.chunk" if chat else "text_completion"

        def choice(i: int, piece: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}
            delta = {} if piece is None else ({"role": "assistant", "content": piece} if first else {"content": piece})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

        def events():
            for i, o in enumerate(outs):
                if chat:
                    yield {**head, "object": obj, "choices": [choice(i, "", None, first=True)]}
                for piece in o.pieces:
                    self._pace(1)
                    yield {**head, "object": obj, "choices": [choice(i, piece, None)]}
                yield {**head, "object": obj, "choices": [choice(i, None, o.finish_reason)]}
            if include_usage:
                yield {**head, "object": obj, "choices": [], "usage": usage}
        self._stream(events())

    def _completions(self, body: dict) -> None:
        prompt = body.get("prompt")
        if prompt is None:
            raise HTTPError(400, "/v1/completions needs prompt")
        prompts = [str(p) for p in prompt] if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt) \
            else [prompt if isinstance(prompt, str) else " ".join(map(str, prompt))]
        self._openai(body, prompts, int(body.get("max_tokens") or 16), chat=False)

    def _chat(self, body: dict) -> None:
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 128
        self._openai(body, [chat_prompt(body.get("messages"))], int(limit), chat=True)
