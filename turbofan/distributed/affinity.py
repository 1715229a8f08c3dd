"""Prefix affinity for `--replicas N`: which replica a request should go to so its prefix cache hits.

Each replica has its own prefix cache (the block manager's chain of KV block hashes), so requests that share a long
prompt prefix — the same system prompt, the next turn of the same conversation, the same document — are cheapest
on the replica that already holds that prefix. The ingress runs no model (no tokenizer, no chat template), so it
keys a request by the text of its prompt: for chat, the messages rendered role by role (`role: content` lines, in
order); for completions and /api/generate, `system` and the prompt (token ids as their decimal list).

A hash of the first N characters alone cannot tell both "same system prompt" and "same conversation": a small N
puts every conversation behind one long system prompt on one key, a large N gives the turns of a short
conversation different keys. So the text is hashed at doubling lengths (64, 128, 256, ... characters, at most
MAX_PREFIX_CHARS), a coarse mirror of the KV cache's block-hash chain, and the router remembers which replica
each hash was last sent to. A request goes to the replica of its longest remembered prefix — the next turn of a
conversation starts with the whole previous prompt, so it finds the previous turn's replica — unless that replica
has more than `threshold` requests outstanding above the least loaded one; otherwise (or when nothing matches:
a new prefix, or one shorter than 64 characters, under one 16-token block) to the replica with the fewest
outstanding requests, ties broken at random. The whole prompt is hashed, the last user turn included: the lookup
finds no match for the part that is new, and the next turn starts with all of it, so its hashes are worth keeping.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

MIN_PREFIX_CHARS = 64  # about one 16-token KV block: a shorter prefix is not worth a detour
MAX_PREFIX_CHARS = 1 << 16
DEFAULT_THRESHOLD = 4  # outstanding requests the prefix's replica may carry above the least loaded one
TABLE_SIZE = 1 << 16  # prefix hashes remembered (least recently used forgotten first)
CHAT_PATHS = frozenset({"/v1/chat/completions", "/api/chat"})
PROMPT_PATHS = frozenset({"/v1/completions", "/api/generate"})


def _content(content: Any) -> str:
    """A message's content as text: a string, or the text parts of OpenAI's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else json.dumps(content, sort_keys=True)


def chat_text(messages: Sequence[Any]) -> str:
    """The conversation as `role: content` lines (tool calls included): the next turn's text starts with this."""
    lines = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        line = f"{m.get('role', '')}: {_content(m.get('content'))}"
        if m.get("tool_calls"):
            line += " " + json.dumps(m["tool_calls"], sort_keys=True)
        lines.append(line + "\n")
    return "".join(lines)


def prompt_text(body: Mapping[str, Any]) -> str:
    """`system` + the prompt; for a list of prompts the first; token ids as their decimal list."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, list):
        prompt = ",".join(str(t) for t in prompt)
    system = body.get("system")
    return (system + "\n" if isinstance(system, str) else "") + (prompt if isinstance(prompt, str) else "")


def prefix_hashes(text: str, salt: str = "") -> list[str]:
    """Hashes of `text`'s first 64, 128, 256, ... characters (those it has), shortest first."""
    out, n = [], MIN_PREFIX_CHARS
    while n <= min(len(text), MAX_PREFIX_CHARS):
        out.append(hashlib.blake2b(f"{salt}\0{text[:n]}".encode("utf-8", "replace"), digest_size=12).hexdigest())
        n *= 2
    return out


def request_prefixes(path: str, body: bytes | Mapping[str, Any]) -> list[str]:
    """The prefix hashes of a request body; none for other routes, bodies that are not JSON, short prompts."""
    if path not in CHAT_PATHS and path not in PROMPT_PATHS:
        return []
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except ValueError:
            return []  # the replica answers the bad JSON
    if not isinstance(body, Mapping):
        return []
    if path in CHAT_PATHS:
        messages = body.get("messages")
        text = chat_text(messages) if isinstance(messages, list) else ""
    else:
        text = prompt_text(body)
    model = body.get("model")
    return prefix_hashes(text, model if isinstance(model, str) else "")


class AffinityTable:
    """Which replica each prefix hash was last sent to, and the routing decision built on it."""

    def __init__(self, size: int = TABLE_SIZE, rng: random.Random | None = None):
        self.size = size
        self.rng = rng or random.Random()
        self.where: OrderedDict[str, str] = OrderedDict()

    def choose(self, prefixes: Sequence[str], loads: Mapping[str, int], threshold: int = DEFAULT_THRESHOLD) -> str:
        """The replica for a request with these prefix hashes, given each live replica's outstanding requests."""
        if not loads:
            raise ValueError("no replicas to choose from")
        least = min(loads.values())
        for h in reversed(prefixes):  # longest first
            replica = self.where.get(h)
            if replica in loads:  # (a replica that died or was replaced is not among the loads)
                if loads[replica] - least <= threshold:
                    return replica
                break  # the longest match is too busy: shorter matches would mostly name the same replica
        return self.rng.choice(sorted(r for r, n in loads.items() if n == least))

    def record(self, prefixes: Sequence[str], replica: str) -> None:
        """The request with these prefixes went to `replica`: its cache now holds them."""
        for h in prefixes:
            self.where[h] = replica
            self.where.move_to_end(h)
        while len(self.where) > self.size:
            self.where.popitem(last=False)
