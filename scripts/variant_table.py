"""Regenerate README.md's variant table from the registries: python scripts/variant_table.py"""

from pathlib import Path

from hf_posvariants.catalog import update_readme

if __name__ == "__main__":
    readme = Path(__file__).resolve().parents[1] / "README.md"
    print("README.md updated" if update_readme(readme) else "README.md already up to date")
