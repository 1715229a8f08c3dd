"""The `turbofan` command: Ollama's verbs (serve, run, pull, list, ps, rm, cp, create, show) plus `bench`.

Flags use vLLM's spelling where vLLM has one. Environment: TURBOFAN_HOST (`host`, `host:port` or a URL),
TURBOFAN_API_KEY, TURBOFAN_ORIGINS and TURBOFAN_ALLOWED_HOSTS (comma-separated), TURBOFAN_MODELS (the model
store). The server listens on 127.0.0.1:8000 by default (vLLM's port; Ollama clients take a base URL, so 11434 is
not needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2:135m"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


# -- addresses ----------------------------------------------------------------------------------------------------
def parse_host(value: str | None) -> tuple[str, int | None]:
    """TURBOFAN_HOST as Ollama reads OLLAMA_HOST: `host`, `host:port`, `:port`, or `http://host:port`."""
    if not value:
        return DEFAULT_HOST, None
    text = value.split("://", 1)[-1].rstrip("/")
    if text.startswith("["):  # [::1]:8000
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text, None
    return host or DEFAULT_HOST, int(port)


def server_url(explicit: str | None) -> str:
    """Where client verbs (ps) find a running server: --url, else TURBOFAN_HOST, else 127.0.0.1:8000."""
    if explicit:
        return explicit.rstrip("/") if "://" in explicit else f"http://{explicit.rstrip('/')}"
    host, port = parse_host(os.environ.get("TURBOFAN_HOST"))
    if host in ("0.0.0.0", "::", ""):
        host = DEFAULT_HOST
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port or DEFAULT_PORT}"


# -- the parser ---------------------------------------------------------------------------------------------------
def _engine_flags(p: argparse.ArgumentParser) -> None:
    """Flags that shape the engine, shared by `serve` and `run` (vLLM's spelling)."""
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, capped)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one engine step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True, help="reuse cached prefixes"
    )
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV-cache size: '2GiB', '512MiB', or a fraction of free RAM")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "float32", "float16"],
        default="auto",
        help="KV-cache dtype; auto: float16 when the weights are served quantized (GGUF by default), else the model's",
    )
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="split the model over this many processes"
    )
    p.add_argument("--num-kv-blocks", type=int, default=None, help=argparse.SUPPRESS)  # tests: force a tiny cache
    p.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    p.add_argument(
        "--tool-call-parser",
        default=None,
        help="format of tool calls in the output: hermes, llama3_json or mistral (default: from the chat template)",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        choices=["deepseek_r1", "qwen3"],
        help="the model thinks in <think>...</think> first: that goes to reasoning_content / thinking, and "
        "structured output and tool constraints apply after it",
    )
    p.add_argument("--tiering", choices=["off", "on"], default="off", help="compile hot shapes in the background")
    p.add_argument("--tier-threshold", type=int, default=32, help="calls before a shape is compiled")
    p.add_argument("--profile", action="store_true", help="count calls and time per component method")
    p.add_argument(
        "--speculative-config",
        type=_json_object,
        default=None,
        help='speculative decoding (vLLM\'s JSON), e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\'',
    )
    p.add_argument(
        "--quantization",
        choices=["auto", "none", "int8", "int4", "int4_all"],
        default="auto",
        help="auto: a GGUF model keeps its file's precision (4/8-bit blocks), safetensors stay float32; "
        "int8/int4: quantize every layer (LM head 8-bit); int4_all: the LM head too; "
        "none: float32, bit-comparable with transformers",
    )


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbofan", description="A local LLM inference server on PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    host, port = parse_host(os.environ.get("TURBOFAN_HOST"))
    s = sub.add_parser("serve", help="serve a model over the OpenAI and Ollama APIs")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"name, hub id or path (default {DEFAULT_MODEL})")
    s.add_argument("--host", default=host, help=f"bind address (default {DEFAULT_HOST} or $TURBOFAN_HOST)")
    s.add_argument("--port", type=int, default=port or DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    s.add_argument("--api-key", default=os.environ.get("TURBOFAN_API_KEY"), help="require this Bearer key")
    s.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=os.environ.get("TURBOFAN_INSECURE_NO_AUTH", "").lower() in ("1", "true", "yes"),
        help="serve on a non-loopback address without --api-key (refused otherwise: anyone who can reach the port "
        "could generate, pull, create and delete models)",
    )
    s.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use for the model")
    s.add_argument(
        "--allowed-origins",
        default=os.environ.get("TURBOFAN_ORIGINS"),
        help="CORS origins, comma-separated, or '*' (default: localhost pages only); requests from any other "
        "Origin are refused with 403",
    )
    s.add_argument(
        "--allowed-hosts",
        default=os.environ.get("TURBOFAN_ALLOWED_HOSTS"),
        help="Host names served besides IP addresses, localhost, *.localhost and this machine's name, "
        "comma-separated ('*.example' for a domain, '*' for any); a guard against DNS rebinding",
    )
    s.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="render a request's own Jinja chat_template (off: such requests get 400; only for trusted clients)",
    )
    s.add_argument(
        "--allow-http-pull",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let clients pull models with POST /api/pull (default on; --no-allow-http-pull: a 403, for a server "
        "others share: pull with `turbofan pull`); no other route ever pulls",
    )
    s.add_argument("--max-waiting", type=int, default=256, help="queued requests before 503")
    s.add_argument("--log-level", default="info")
    s.add_argument("--log-format", choices=["json", "text"], default="json")
    s.add_argument("--stats-interval", type=float, default=10.0, help="seconds between engine-stats log lines")
    s.add_argument("--enable-debug-endpoints", action="store_true", help="serve /debug/* (queues, KV, profiles)")
    s.add_argument("--max-request-bytes", type=int, default=8 << 20, help="larger bodies get 413 (default 8 MiB)")
    s.add_argument("--max-connections", type=int, default=1024, help="open connections before 503")
    s.add_argument("--header-timeout", type=float, default=10.0, help="seconds to send a request head")
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds to send a request body (then 408)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, help="SIGTERM: seconds running requests get")
    s.add_argument("--replicas", type=int, default=None, help="engines as Ray Serve replicas (needs turbofan[ray])")
    s.add_argument("--ray-address", default=None, help="join this Ray cluster ('auto' after `ray start`)")
    s.add_argument("--replica-threads", type=int, default=None, help="torch threads per replica (default: cores/N)")
    s.add_argument("--affinity-threshold", type=int, default=None,
                   help="replicas: requests a prompt prefix's replica may have outstanding above the least loaded "
                        "one before the request goes elsewhere (default 4; negative: no prefix affinity)")  # fmt: skip
    s.add_argument("--max-loaded-models", type=int, default=3, help="models loaded at once (others load on demand)")
    s.add_argument(
        "--memory-budget", default=None, help="memory for loaded models: '8GiB', or a fraction of free RAM (default 0.8)"
    )
    s.add_argument(
        "--keep-alive",
        default=os.environ.get("TURBOFAN_KEEP_ALIVE", "5m"),
        help="how long an on-demand model stays loaded after its last request ('5m', seconds, -1 = forever)",
    )
    _engine_flags(s)

    r = sub.add_parser("run", help="chat with a model in this terminal (or answer one prompt)")
    r.add_argument("model", help="name, hub id or path")
    r.add_argument("prompt", nargs="*", help="answer this and exit (default: interactive chat)")
    r.add_argument("--temperature", type=float, default=0.8)
    r.add_argument("--top-p", type=float, default=0.9)
    r.add_argument("--top-k", type=int, default=40)
    r.add_argument("--repeat-penalty", type=float, default=1.1)
    r.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer (default: to the context)")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--system", default=None, help="a system message")
    r.add_argument("--verbose", action="store_true", help="print timings after each answer")
    _engine_flags(r)

    for name, text in (("pull", "download a model into the store"), ("rm", "remove a model from the store"),
                       ("show", "describe a model")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("name")
    cp = sub.add_parser("cp", help="copy a model in the store under another name")
    cp.add_argument("source")
    cp.add_argument("destination")
    cr = sub.add_parser("create", help="create a named variant of a local model from a Modelfile")
    cr.add_argument("name")
    cr.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (FROM, PARAMETER, SYSTEM, TEMPLATE)")
    sub.add_parser("list", aliases=["ls"], help="list the models in the store")
    ps = sub.add_parser("ps", help="the model a running server has loaded")
    ps.add_argument("--url", default=None, help="server base URL (default $TURBOFAN_HOST or 127.0.0.1:8000)")

    b = sub.add_parser("bench", help="benchmarks: `bench serve` (HTTP load), `bench offline` (engine), `bench soak`, "
                       "`bench structured` (JSON-schema cost)")  # fmt: skip
    b.add_argument("kind", choices=["serve", "offline", "soak", "structured"])
    b.add_argument("args", nargs=argparse.REMAINDER, help="see `turbofan bench serve --help`")
    return parser


# -- serve --------------------------------------------------------------------------------------------------------
def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError:  # a long template string is not a path
        pass
    return value


def engine_config(args: argparse.Namespace, served_name: str | None = None):
    from turbofan.config import EngineConfig

    return EngineConfig(
        model=args.model,
        served_model_name=served_name,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        chat_template=_read_template(args.chat_template),
        models_dir=os.environ.get("TURBOFAN_MODELS"),
        tiering=args.tiering,
        tier_threshold=args.tier_threshold,
        profile=args.profile,
        quantization=getattr(args, "quantization", None),
        log_stats_interval=getattr(args, "stats_interval", 0.0),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        speculative_config=getattr(args, "speculative_config", None),
    )


def engine_factory(config):
    """How the server builds a model other than the one it started with: the same engine flags, another model
    directory; an encoder (BERT family) becomes an embedding engine. Returns the source, its kind and its memory
    estimate (see turbofan/server/manager.py)."""
    import dataclasses

    from turbofan.model.footprint import estimate, is_encoder

    def build(path: Path, name: str):
        footprint = estimate(path, config)
        if is_encoder(path):
            from turbofan.engine.embedding import EmbeddingEngine

            return EmbeddingEngine(path, name), "embedding", footprint
        from turbofan.assembly import build_engine

        variant = dataclasses.replace(config, model=str(path), served_model_name=name)
        return (lambda: build_engine(variant)), "completion", footprint

    return build


def check_exposure(args: argparse.Namespace, log) -> bool:
    """False (and why, logged) when the server would listen beyond this machine without a key: on a LAN or in a
    container that is publishing unauthenticated generation and model management to everyone who can reach it."""
    from turbofan.server.boundary import is_loopback_bind

    if is_loopback_bind(args.host) or args.api_key:
        return True
    if args.insecure_no_auth:
        log.warning(
            "serving without an API key on a non-loopback address (--insecure-no-auth): anyone who can reach "
            f"{args.host}:{args.port} can generate, pull, create and delete models",
            extra={"host": args.host, "port": args.port},
        )
        return True
    log.error(
        f"refusing to listen on {args.host} without an API key: anyone who can reach that address could generate, "
        "pull, create and delete models. Set --api-key (or TURBOFAN_API_KEY), listen on 127.0.0.1, or pass "
        "--insecure-no-auth (TURBOFAN_INSECURE_NO_AUTH=1) if a firewall or a loopback-only port mapping already "
        "keeps others out",
        extra={"host": args.host, "port": args.port},
    )
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from turbofan.config import parse_memory
    from turbofan.server import ServerSettings, create_app
    from turbofan.server.guard import header_timeout_protocol
    from turbofan.server.lifecycle import GracefulServer
    from turbofan.server.logs import configure_logging
    from turbofan.server.tools import tool_parser

    try:
        tool_parser(args.tool_call_parser)
    except ValueError as exc:
        print(f"turbofan serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    log = logging.getLogger("turbofan.server")
    if not check_exposure(args, log):
        return 2
    names = args.served_model_name or []
    config = engine_config(args, names[0] if names else None)
    origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()] or None
    settings = ServerSettings(
        api_key=args.api_key or None,
        allowed_origins=origins,
        host=args.host,
        allowed_hosts=[h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip()],
        served_model_names=names,
        max_waiting=args.max_waiting,
        chat_template=config.chat_template,
        trust_request_chat_template=args.trust_request_chat_template,
        allow_http_pull=args.allow_http_pull,
        stats_interval=args.stats_interval,
        models_dir=config.models_dir,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        debug_endpoints=args.enable_debug_endpoints,
        max_request_bytes=args.max_request_bytes,
        body_timeout=args.body_timeout,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        shutdown_timeout=args.shutdown_timeout,
        max_loaded_models=args.max_loaded_models,
        memory_budget_bytes=parse_memory(args.memory_budget or 0.8),
        keep_alive=args.keep_alive,
    )

    if args.replicas is not None or args.ray_address:
        return _serve_replicas(args, config, settings)

    def load():
        from turbofan.assembly import build_engine

        return build_engine(config)

    app = create_app(load, settings, engine_factory(config))
    log.info(
        "turbofan serving",
        extra={"model": args.model, "host": args.host, "port": args.port, "auth": bool(settings.api_key)},
    )
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        http=header_timeout_protocol(settings.header_timeout),
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=5,
    )
    server = GracefulServer(uv_config, app.state.ctx, settings.shutdown_timeout)
    server.run()
    client = app.state.ctx.client
    report = client.profile_report() if client is not None else None
    if report is not None:
        print(report)  # seed 002: the per-method table when the server stops
    return 1 if server.engine_died else 0


def _serve_replicas(args: argparse.Namespace, config, settings) -> int:
    try:
        from turbofan.distributed.replicas import serve_replicas
    except ImportError as e:  # pragma: no cover - depends on the extra
        print(f"--replicas needs Ray Serve: pip install 'turbofan[ray]' ({e})", file=sys.stderr)
        return 2
    if args.replicas is not None and args.replicas < 1:
        print("--replicas must be at least 1", file=sys.stderr)
        return 2
    replicas = args.replicas or 1
    threads = args.replica_threads or max(1, len(os.sched_getaffinity(0)) // replicas)
    return serve_replicas(
        config, settings, args.host, args.port, replicas, args.ray_address, threads, args.affinity_threshold
    )


# -- run ----------------------------------------------------------------------------------------------------------
RUN_HELP = """Available commands:
  /clear   forget the conversation
  /bye     exit
  /?       this help
Ctrl+C stops an answer; Ctrl+D or /bye leaves."""


class _Interrupt:
    """While an answer streams, Ctrl+C asks the loop to stop between engine steps (never mid-step)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        import signal

        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_: Any) -> None:
        self.requested = True

    def __exit__(self, *_: Any) -> None:
        import signal

        signal.signal(signal.SIGINT, self._previous)


class Chat:
    """`turbofan run`: the engine in this process, stepped directly, printing text as it is decoded."""

    def __init__(self, engine, args: argparse.Namespace):
        self.engine = engine
        self.args = args
        self.history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
        self.turns = 0

    def params(self):
        from turbofan.engine import SamplingParams

        a = self.args
        return SamplingParams(
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            repetition_penalty=a.repeat_penalty,
            repeat_last_n=64,
            max_tokens=a.max_tokens,
            seed=a.seed,
        )

    def prompt_ids(self, user: str) -> list[int]:
        tok = self.engine.tokenizer
        messages = [*self.history, {"role": "user", "content": user}]
        if tok.has_chat_template:
            return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        return tok.encode("\n".join(m["content"] for m in messages))

    def answer(self, user: str, out=sys.stdout) -> str:
        import time

        ids = self.prompt_ids(user)
        request_id = f"run-{self.turns}"
        self.turns += 1
        self.engine.add_request(request_id, ids, self.params())
        from turbofan.engine import OutputBuilder

        builder, final = OutputBuilder(), None
        start = time.time()
        with _Interrupt() as stop:
            while True:
                if stop.requested:
                    self.engine.abort_request(request_id)
                    break
                for delta in self.engine.step():
                    if delta.request_id != request_id:
                        continue
                    builder.add(delta)
                    if delta.outputs and delta.outputs[0].text:
                        out.write(delta.outputs[0].text)
                        out.flush()
                    if delta.finished:
                        final = builder.output()
                if final is not None or not self.engine.has_unfinished_requests():
                    break
        text = builder.output().outputs[0].text if builder.last is not None else ""
        out.write("\n")
        if self.args.verbose and final is not None:
            n = len(final.outputs[0].token_ids)
            secs = time.time() - start
            ttft = final.metrics.time_to_first_token or 0.0
            print(
                f"prompt tokens: {len(ids)}  output tokens: {n}  time to first token: {ttft:.3f}s  "
                f"rate: {n / secs if secs else 0:.2f} tokens/s",
                file=sys.stderr,
            )
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text

    def interactive(self) -> int:
        print('Send a message (/? for help, /bye to leave)', flush=True)
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\nUse Ctrl + d or /bye to exit.")
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/bye", "/exit", "/quit"):
                return 0
            if text in ("/?", "/help"):
                print(RUN_HELP)
                continue
            if text == "/clear":
                self.history = self.history[:1] if self.args.system else []
                print("Cleared session context")
                continue
            if text.startswith("/"):
                print(f"Unknown command '{text.split()[0]}'. Type /? for help")
                continue
            self.answer(text)
            print()


def cmd_run(args: argparse.Namespace) -> int:
    from turbofan.assembly import build_engine

    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
    config = engine_config(args)
    if not prompt:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    chat = Chat(build_engine(config), args)
    if prompt:
        chat.answer(prompt)
        return 0
    return chat.interactive()


# -- the store ----------------------------------------------------------------------------------------------------
def _store():
    from turbofan.store import ModelStore

    return ModelStore(os.environ.get("TURBOFAN_MODELS"))


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_ago(stamp: str | None) -> str:
    if not stamp:
        return ""
    try:
        then = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return str(stamp)
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    secs = (datetime.now(timezone.utc) - then).total_seconds()
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if secs >= size:
            k = int(secs // size)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("   ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def cmd_pull(args: argparse.Namespace) -> int:
    _store().pull(args.name, progress=True)
    print("success")
    return 0


def cmd_list(_args: argparse.Namespace) -> int:
    rows = [
        [m.name, m.short_digest, human_size(m.size), human_ago(m.modified_at.isoformat())] for m in _store().list()
    ]
    print(table(rows, ["NAME", "ID", "SIZE", "MODIFIED"]))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    _store().remove(args.name)
    print(f"deleted '{args.name}'")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    _store().copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from turbofan.store.modelfile import parse_modelfile

    modelfile = parse_modelfile(Path(args.file).read_text(encoding="utf-8"))
    _store().copy(modelfile.from_, args.name, modelfile.to_dict())
    print(f"created '{args.name}' from '{modelfile.from_}'")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    info = _store().show(args.name)
    e = info.entry
    rows = [
        ("architecture", e.family or e.model_type),
        ("parameters", e.parameter_size),
        ("context length", e.context_length),
        ("quantization", e.quantization),
        ("format", e.format),
        ("source", e.source),
        ("path", e.path),
        ("digest", e.short_digest),
    ]
    print("  Model")
    for label, value in rows:
        if value not in (None, ""):
            print(f"    {label:<16}{value}")
    if info.chat_template:
        print("\n  Chat template\n    " + info.chat_template.strip().replace("\n", "\n    ")[:2000])
    if info.license:
        print("\n  License\n    " + info.license.strip().splitlines()[0])
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    import httpx

    url = server_url(args.url)
    headers = {}
    if os.environ.get("TURBOFAN_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['TURBOFAN_API_KEY']}"
    try:
        reply = httpx.get(f"{url}/api/ps", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(f"Error: could not reach a turbofan server at {url} ({exc}); is `turbofan serve` running?",
              file=sys.stderr)  # fmt: skip
        return 1
    if reply.status_code != 200:
        print(f"Error: {url}/api/ps answered {reply.status_code}: {reply.text}", file=sys.stderr)
        return 1
    rows = []
    for m in reply.json().get("models", []):
        vram = m.get("size_vram") or 0
        processor = "100% GPU" if vram and vram >= m.get("size", 0) else "100% CPU"
        rows.append(
            [
                m.get("name", ""),
                str(m.get("digest", ""))[:12],
                human_size(m.get("size", 0)),
                processor,
                str(m.get("context_length", "")),
                "Forever" if str(m.get("expires_at", "")) > "2100" else m.get("expires_at", ""),
            ]
        )
    print(table(rows, ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.kind == "serve":
        from turbofan.bench import serve as bench
    elif args.kind == "soak":
        from turbofan.bench import soak as bench  # careless and hostile clients against a running server
    elif args.kind == "structured":
        from turbofan.bench import structured as bench
    else:
        from turbofan.bench import offline as bench  # the engine's benchmark, no HTTP
    return int(bench.main(args.args) or 0)


COMMANDS = {
    "serve": cmd_serve,
    "run": cmd_run,
    "pull": cmd_pull,
    "list": cmd_list,
    "ls": cmd_list,
    "ps": cmd_ps,
    "rm": cmd_rm,
    "cp": cmd_cp,
    "create": cmd_create,
    "show": cmd_show,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from turbofan.store.errors import StoreError

        if isinstance(exc, StoreError | ValueError | FileNotFoundError):
            print(f"Error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
