"""README.md stays true: its variant table is rendered text naming every registered variant and backend,
and its fresh-machine section holds exactly the two commands CI runs."""

import importlib.util
import re
from pathlib import Path

from hf_posvariants import FAMILIES, POSITION_ENCODINGS
from hf_posvariants.bias_route import BIASLESS_BACKENDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- variant-table:begin -->", "<!-- variant-table:end -->"


def section(text: str, heading: str) -> str:
    """The body of a `## heading` section, up to the next `## ` heading."""
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def variant_table_text() -> str:
    return README.read_text().split(BEGIN, 1)[1].split(END, 1)[0]


def test_variant_table_is_rendered_text():
    table = variant_table_text()
    assert "{" not in table and "}" not in table, "template text left in the README's variant table"
    assert "join(" not in table
    for backend in BIASLESS_BACKENDS:
        assert f"`{backend}`" in table


def test_variant_table_names_every_registered_family_and_encoding():
    table = variant_table_text()
    for config_class in FAMILIES:
        assert f"| `{config_class.model_type}` |" in table
    for name, encoding in POSITION_ENCODINGS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"| {encoding.kind}" in row
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip("|"))]  # "\|" inside a cell is text
        flash_cell = cells[6]  # name, kind, paper, eager, sdpa, flex, flash, KV cache, length limit
        refuses_flash = encoding.backends is not None and "flash_attention_2" not in encoding.backends
        assert (flash_cell == "refused") == refuses_flash, row
        assert ("no (recomputes)" in row) == (not encoding.cacheable)


def test_variant_table_is_what_the_generator_writes_now():
    spec = importlib.util.spec_from_file_location("variant_table", ROOT / "scripts" / "variant_table.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert variant_table_text().strip() == generator.variant_table(), "run: python scripts/variant_table.py"


def test_readme_has_exactly_the_two_fresh_machine_commands():
    fresh = section(README.read_text(), "On a fresh machine")
    blocks = re.findall(r"```bash\n(.*?)```", fresh, flags=re.DOTALL)
    commands = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert all(command.startswith("bash scripts/setup.sh && ") for command in commands)
    test_command = next(command for command in commands if "pytest" in command)
    assert test_command in (ROOT / ".ci" / "run").read_text()
