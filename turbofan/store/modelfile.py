"""Ollama's Modelfile: a named variant of a local model (`FROM`, `PARAMETER`, `SYSTEM`, `TEMPLATE`).

A variant is stored as its own store entry whose files are hard links to the base model's, with the Modelfile's
settings in its manifest (`turbofan.json`, key "modelfile"); the Ollama routes apply them as defaults that a
request's own fields override."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import StoreError

# Options a PARAMETER line may set (Ollama's names), with their types.
PARAMETERS: dict[str, type] = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
    "repeat_last_n": int, "presence_penalty": float, "frequency_penalty": float, "seed": int, "num_predict": int,
    "num_ctx": int, "stop": str,
}  # fmt: skip
_TRIPLE = re.compile(r'"""(.*?)"""', re.S)


class ModelfileError(StoreError):
    """A Modelfile that cannot be used as written."""


@dataclass
class Modelfile:
    from_: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "from_" and v not in (None, {})}

    def render(self) -> str:
        """Back to Modelfile text (for /api/show)."""
        lines = [f"FROM {self.from_}"]
        for key, value in self.parameters.items():
            for v in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {key} {json.dumps(v) if isinstance(v, str) else v}")
        if self.template is not None:
            lines.append(f'TEMPLATE """{self.template}"""')
        if self.system is not None:
            lines.append(f'SYSTEM """{self.system}"""')
        return "\n".join(lines) + "\n"


def coerce_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Checked option values: known names, the right types, `stop` always a list."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        kind = PARAMETERS.get(key)
        if kind is None:
            raise ModelfileError(f"unknown parameter {key!r}; known: {', '.join(sorted(PARAMETERS))}")
        values = value if isinstance(value, list) else [value]
        try:
            if key == "stop":
                out[key] = [str(v) for v in values]
            else:
                out[key] = kind(values[-1]) if kind is float else int(float(values[-1]))
        except (TypeError, ValueError):
            raise ModelfileError(f"parameter {key} must be a number, got {value!r}") from None
    return out


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return json.loads(text) if "\\" in text else text[1:-1]
    return text


def parse_modelfile(text: str) -> Modelfile:
    """FROM, PARAMETER (repeatable), SYSTEM and TEMPLATE (triple-quoted values may span lines); # comments."""
    placeholders: list[str] = []

    def hold(m: re.Match) -> str:
        placeholders.append(m.group(1))
        return f"\0{len(placeholders) - 1}\0"

    body = _TRIPLE.sub(hold, text)
    mf, raw = Modelfile(), {}
    for number, line in enumerate(body.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        command, _, rest = line.partition(" ")
        command = command.upper()
        rest = re.sub(r"\0(\d+)\0", lambda m: placeholders[int(m.group(1))], rest.strip())
        if command == "FROM":
            mf.from_ = rest
        elif command == "PARAMETER":
            key, _, value = rest.partition(" ")
            raw.setdefault(key, []).append(_unquote(value))
        elif command == "SYSTEM":
            mf.system = _unquote(rest) if "\0" not in line else rest
        elif command == "TEMPLATE":
            mf.template = _unquote(rest) if "\0" not in line else rest
        elif command == "LICENSE":
            continue
        else:
            raise ModelfileError(
                f"line {number}: {command} is not supported (FROM, PARAMETER, SYSTEM, TEMPLATE are)"
            )
    if not mf.from_:
        raise ModelfileError("the Modelfile has no FROM line: name the local model it is a variant of")
    mf.parameters = coerce_parameters(raw)
    return mf
