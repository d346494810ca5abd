"""README.md stays true: its variant table is the one the registries generate, its commands exist."""

from pathlib import Path

from hf_posvariants.catalog import BEGIN, END, variant_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_variant_table_is_up_to_date():
    text = README.read_text()
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == variant_table(), "run: python scripts/variant_table.py"


def test_readme_has_exactly_the_two_fresh_machine_commands():
    commands = [line for line in README.read_text().splitlines() if line.startswith("bash scripts/setup.sh")]
    assert len(commands) == len(set(commands)) >= 1
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci
