"""README.md's variant table, generated from the registries so a new encoding or family appears by itself.

    PYTHONPATH=$PWD python scripts/variant_table.py            # rewrite the table between the markers
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hf_posvariants import FAMILIES, POSITION_ENCODINGS
from hf_posvariants.attention import ATTENTION_VARIANTS
from hf_posvariants.bias_route import BIASLESS_BACKENDS

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- variant-table:begin -->", "<!-- variant-table:end -->"


def summary(cls: type) -> str:
    """The first paragraph of a docstring, on one line, safe inside a Markdown table."""
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines()).replace("|", "\\|")


# The table's backend columns: transformers' implementation name for each.
BACKEND_COLUMNS = {"eager": "eager", "sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2"}


def backend_cells(component: type) -> list[str]:
    """"yes" or "refused" per backend column, from the registry entry's declared `backends`."""
    return ["yes" if component.backends is None or backend in component.backends else "refused"
            for backend in BACKEND_COLUMNS.values()]


def encoding_rows() -> list[str]:
    rows = [
        f"| `position_encoding` | kind | paper | {' | '.join(BACKEND_COLUMNS)} | KV cache | length limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, encoding in POSITION_ENCODINGS.items():
        paper = summary(encoding)
        cache = "yes" if encoding.cacheable else "no (recomputes)"
        limit = "`max_position_embeddings`" if encoding.bounded else "none"
        kind = encoding.kind if encoding.kind != "relative" else "relative (with its attention variant)"
        rows.append(f"| `{name}` | {kind} | {paper} | {' | '.join(backend_cells(encoding))} | {cache} | {limit} |")
    return rows


def attention_rows() -> list[str]:
    rows = [f"| `attention_variant` | paper | {' | '.join(BACKEND_COLUMNS)} |", "|---|---|---|---|---|---|"]
    for name, variant in ATTENTION_VARIANTS.items():
        rows.append(f"| `{name}` | {summary(variant)} | {' | '.join(backend_cells(variant))} |")
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
    biasless = ", ".join(f"`{backend}`" for backend in BIASLESS_BACKENDS)
    note = (
        f"Every encoding works in every family that has `{AutoModelForCausalLM.__name__}` (causal, `generate()`), "
        f"with it and with `{AutoModelForMaskedLM.__name__}` (bidirectional); `posvar_deberta` takes absolute "
        f"encodings (or `nope`) for its input positions beside its own relative ones. The flash backends and "
        f"continuous batching's eager kernel ({biasless}) have no place for a score bias, so what adds one refuses "
        "them with a ValueError: the backend columns are "
        "each registry entry's declared `backends`."
    )
    return "\n".join([*family_rows(), "", *encoding_rows(), "", *attention_rows(), "", note])


def update_readme(readme: Path = README) -> bool:
    """Rewrite the table between the markers; returns whether anything changed."""
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{variant_table()}\n{END}{tail}"
    readme.write_text(new)
    return new != text


if __name__ == "__main__":
    print("README.md updated" if update_readme() else "README.md already up to date")
