"""ServerSettings: what the HTTP layer needs that the engine does not (auth, CORS, names, queue bound)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Browsers on this machine may call the API; others need --allowed-origins.
LOCAL_ORIGIN_REGEX = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


@dataclass
class ServerSettings:
    api_key: str | None = None
    allowed_origins: list[str] | None = None  # None: localhost origins only; ["*"]: any origin
    # The bind address (None: not bound to a socket, as in tests) and the names added to the Host check
    # (server/boundary.py): on a loopback bind only IP literals, localhost, *.localhost and this machine's name pass.
    host: str | None = None
    allowed_hosts: list[str] | None = None
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model name
    max_waiting: int = 256
    chat_template: str | None = None  # overrides the tokenizer's template
    # A request's own Jinja `chat_template` runs only with --trust-request-chat-template (vLLM's flag): the sandbox
    # bounds attribute access, not work (nested range loops pin a thread for hours).
    trust_request_chat_template: bool = False
    # POST /api/pull (the only route that downloads: inference and GET routes serve what the store holds);
    # --no-allow-http-pull turns it off (403) on a server others share, where the operator pulls with the CLI.
    allow_http_pull: bool = True
    stats_interval: float = 10.0  # seconds between engine-stats log lines; 0 turns them off
    models_dir: str | None = None  # the model store (for /api/tags, /api/pull, ...); None: its default
    tool_call_parser: str | None = None  # None: chosen from the chat template (server/tool_parsers.py)
    reasoning_parser: str | None = None  # deepseek_r1 | qwen3: the model thinks first (server/reasoning.py)
    debug_endpoints: bool = False  # /debug/* (KV blocks, queues, profiles): only with --enable-debug-endpoints
    max_request_bytes: int = 8 << 20  # bodies above this are refused with 413 before they are buffered
    body_timeout: float = 30.0  # seconds a request body may take to arrive (then 408)
    header_timeout: float = 10.0  # seconds a connection may take to send its request head (then closed)
    max_connections: int = 1024  # open connections + requests before uvicorn answers 503
    shutdown_timeout: float = 30.0  # SIGTERM: seconds running requests may take to finish
    # Several models (server/manager.py): how many may be loaded at once, within how many bytes (None: 80% of the
    # RAM available at start), and how long an on-demand model stays after its last request (Ollama's keep_alive).
    max_loaded_models: int = 3
    memory_budget_bytes: int | None = None
    keep_alive: str | float = "5m"

    def cors_options(self) -> dict:
        """Keyword arguments for Starlette's CORSMiddleware."""
        common = dict(allow_methods=["*"], allow_headers=["*"], allow_credentials=False, max_age=600)
        origins = [o.strip() for o in (self.allowed_origins or []) if o.strip()]
        if not origins:
            return dict(allow_origins=[], allow_origin_regex=LOCAL_ORIGIN_REGEX, **common)
        if "*" in origins:
            return dict(allow_origins=["*"], **common)
        return dict(allow_origins=origins, **common)
