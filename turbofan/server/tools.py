"""Tool calling: tools into the prompt, the model's calls out of its text, a grammar when a call is required.

- `ToolRequest.parse` checks OpenAI's `tools` and `tool_choice` ("auto", "none", "required", or a named
  function); a malformed tool or an unknown name is a 400.
- `prepare_messages` renders the conversation for the chat template: with a template that knows tools (its
  source mentions `tools`, e.g. Qwen2.5's) the tools go to `apply_chat_template(..., tools=...)`; for one that
  does not (SmolLM2's) the documented fallback describes them in the system message, with the hermes call
  format, and turns earlier calls and tool results into text the template can show.
- A `ToolParser` (tool_parsers.py) knows one output format: hermes, llama3_json or mistral, chosen from the chat
  template's source (`select_parser`) unless `--tool-call-parser` names one. Its `forced_grammar` forces a call
  (tool_choice "required" or named), its `auto_grammar` enforces `strict` tools' parameters under "auto", and its
  `stream()` turns text, as it arrives, into content and tool-call events (name first, then argument fragments).
- `tool_choice: "none"` leaves the tools out of the prompt and the output unparsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from turbofan.engine.constraints import StructuredOutput
from turbofan.server.errors import bad_request
from turbofan.server.tool_parsers import (  # noqa: F401  (the parsers' names, as imported from here before)
    TOOL_PARSERS,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ParsedCall,
    ToolEvent,
    ToolParser,
    ToolStream,
    call_id,
    call_schema,
    select_parser,
    tool_parser,
)

NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class ToolRequest:
    tools: list[dict]  # OpenAI's shape: {"type": "function", "function": {"name", "description", "parameters"}}
    choice: str  # "auto" | "required" | the name of the function that must be called

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    @property
    def strict(self) -> bool:
        """Some tool asks for `strict: true` parameters (enforced under "auto" too, by the parser's auto grammar)."""
        return any(t["function"].get("strict") is True for t in self.tools)

    @classmethod
    def parse(cls, tools: Any, tool_choice: Any) -> ToolRequest | None:
        """None when no tool may be called (no tools, or tool_choice "none")."""
        if tools is None or tools == []:
            if tool_choice not in (None, "none", "auto"):
                raise bad_request("tool_choice needs tools", "tool_choice")
            return None
        if not isinstance(tools, list):
            raise bad_request("tools must be a list", "tools")
        checked = [_check_tool(t, i) for i, t in enumerate(tools)]
        names = [t["function"]["name"] for t in checked]
        if len(set(names)) != len(names):
            raise bad_request(f"tool names must be unique, got {names}", "tools")
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
            if not isinstance(name, str):
                raise bad_request('a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice")
            if name not in names:
                raise bad_request(f"tool_choice names {name!r}, which is not one of the tools ({', '.join(names)})",
                                  "tool_choice")  # fmt: skip
            choice = name
        elif choice == "none":
            return None
        elif choice not in ("auto", "required"):
            raise bad_request(f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                              "tool_choice")  # fmt: skip
        return cls(checked, choice)


def _check_tool(tool: Any, i: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
        tool.get("function"), dict
    ):
        raise bad_request(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', "tools")
    fn = dict(tool["function"])
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise bad_request(f"tools[{i}].function.name must be 1-64 letters, digits, _, . or -, got {name!r}", "tools")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    fn["parameters"] = params
    return {"type": "function", "function": fn}


def tool_constraint(tools: ToolRequest | None, parser: ToolParser, other: bool) -> StructuredOutput | None:
    """The grammar a tool request puts on the answer: a forced call (required or named), or, under "auto" with
    a `strict` tool, calls whose arguments follow the schema; None otherwise. `other`: the request also asks for
    a response format (one constraint per request, so a tool grammar together with it is a 400)."""
    if tools is None or not (tools.forced or tools.strict):
        return None
    if other:
        what = "a required or named tool_choice" if tools.forced else 'a strict tool under tool_choice "auto"'
        raise bad_request(f"{what} cannot be combined with a response format (one constraint per request)",
                          "tool_choice")  # fmt: skip
    return parser.forced_grammar(tools) if tools.forced else parser.auto_grammar(tools)


# -- prompts ------------------------------------------------------------------------------------------------------
def template_supports_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def chat_template_source(tokenizer, override: str | None) -> str:
    """The Jinja source the chat will be rendered with (an override, else the tokenizer's own)."""
    return override or getattr(tokenizer.hf, "chat_template", None) or ""


FALLBACK_PROMPT = """You can call functions. Their signatures are within <tools></tools> XML tags:
<tools>
{tools}
</tools>
To call a function, answer with a JSON object inside <tool_call></tool_call> tags and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": <arguments as a JSON object>}}
</tool_call>"""


def _arguments_object(args: Any) -> Any:
    """Templates print arguments with `tojson`: a JSON string is turned back into its object first."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def prepare_messages(messages: list[dict], tools: ToolRequest | None, native: bool) -> tuple[list[dict], dict]:
    """(messages, extra apply_chat_template kwargs) for a conversation that may hold calls and tool results."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            m["tool_calls"] = [
                {**c, "function": {**c.get("function", {}), "arguments": _arguments_object(c.get("function", {}).get("arguments"))}}
                for c in calls
            ]  # fmt: skip
            if not native:
                text = "\n".join(
                    f"<tool_call>\n{json.dumps({'name': c['function'].get('name'), 'arguments': c['function']['arguments']})}\n</tool_call>"
                    for c in m.pop("tool_calls")
                )  # fmt: skip
                m["content"] = ((m.get("content") or "") + "\n" + text).strip()
        if m["role"] == "tool" and not native:
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if tools is None:
        return out, {}
    if native:
        return out, {"tools": tools.tools}
    described = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools.tools))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{described}".strip()}
    else:
        out.insert(0, {"role": "system", "content": described})
    return out, {}


# -- OpenAI's shapes ----------------------------------------------------------------------------------------------
def openai_calls(calls: list[ParsedCall]) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def openai_deltas(events: list[ToolEvent], calls: list[ParsedCall]) -> list[dict]:
    """Stream deltas as OpenAI sends them: content; a call's index, id, type and name; then argument fragments."""
    out: list[dict] = []
    for e in events:
        if e.kind == "content":
            if out and "content" in out[-1]:
                out[-1]["content"] += e.text
            else:
                out.append({"content": e.text})
        elif e.kind == "call":
            call = calls[e.index]
            fn = {"name": call.name, "arguments": ""}
            out.append({"tool_calls": [{"index": e.index, "id": call.id, "type": "function", "function": fn}]})
        else:
            out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return out


def ollama_calls(calls: list[ParsedCall]) -> list[dict]:
    """Ollama's tool_calls: arguments as a JSON object (its client validates them as a mapping)."""
    out = []
    for i, c in enumerate(calls):
        args = _arguments_object(c.arguments)
        out.append({"function": {"index": i, "name": c.name, "arguments": args if isinstance(args, dict) else {}}})
    return out
