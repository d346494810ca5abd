"""The variant table of README.md, generated from the registries so a new encoding or family appears by itself."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from . import FAMILIES
from .configuration_posvariants import BIASLESS_BACKENDS
from .position_encodings import POSITION_ENCODINGS

BEGIN, END = "<!-- variant-table:begin -->", "<!-- variant-table:end -->"


def summary(cls: type) -> str:
    """The first paragraph of a docstring, on one line, safe inside a Markdown table."""
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines()).replace("|", "\\|")


def encoding_rows() -> list[str]:
    rows = [
        "| `position_encoding` | kind | paper | eager | sdpa | flex | flash | KV cache | length limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, encoding in POSITION_ENCODINGS.items():
        paper = summary(encoding)

        def runs_on(backend: str) -> str:
            return "yes" if encoding.backends is None or backend in encoding.backends else f"refused ({encoding.kind})"

        eager, sdpa, flex = (runs_on(backend) for backend in ("eager", "sdpa", "flex_attention"))
        flash = runs_on(BIASLESS_BACKENDS[0])
        cache = "yes" if encoding.cacheable else "no (recomputes)"
        limit = "`max_position_embeddings`" if encoding.bounded else "none"
        rows.append(f"| `{name}` | {encoding.kind} | {paper} | {eager} | {sdpa} | {flex} | {flash} | {cache} | {limit} |")
    return rows


def family_rows() -> list[str]:
    rows = ["| `model_type` | block | default encoding | heads |", "|---|---|---|---|"]
    for config_class, models in FAMILIES.items():
        defaults = config_class()
        block = f"{defaults.norm_type} ({defaults.norm_position}-norm), {defaults.mlp_type} MLP, {defaults.attention_variant} attention"
        heads = ", ".join(f"`{auto.__name__}`" for auto in models)
        rows.append(f"| `{config_class.model_type}` | {block} | `{defaults.position_encoding}` | {heads} |")
    return rows


def variant_table() -> str:
    note = (
        f"Every encoding works in every family that has `{AutoModelForCausalLM.__name__}` (causal, `generate()`), "
        f"with it and with `{AutoModelForMaskedLM.__name__}` (bidirectional); `posvar_deberta` takes absolute "
        f"encodings (or `nope`) for its input positions beside its own relative ones. Flash backends ({', '.join(BIASLESS_BACKENDS)}) "
        "have no place for a score bias, so bias encodings refuse them with a ValueError; CoPE's bias needs a sum over "
        "each score row, which flex's score function cannot see, so it runs on eager and SDPA. "
        "`layer_position_encodings` gives layers different encodings (e.g. RoPE in three of four layers, NoPE in the fourth)."
    )
    return "\n".join([*family_rows(), "", *encoding_rows(), "", note])


def update_readme(readme: Path) -> bool:
    """Rewrite the table between the markers; returns whether anything changed."""
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{variant_table()}\n{END}{tail}"
    readme.write_text(new)
    return new != text
