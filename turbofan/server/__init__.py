"""HTTP front end: OpenAI- and Ollama-compatible APIs over one AsyncEngine."""

from turbofan.server.app import create_app
from turbofan.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
