"""Train every variant of a recipe under one budget, then evaluate extrapolation and probes, and
write one report ranking them.

    PYTHONPATH=$PWD python scripts/compare.py configs/compare/war_and_peace.yaml

Paths in the recipe are relative to the repository root (the data lives in ../shared/data).
`--set section.key=value` overrides one recipe value (YAML syntax), e.g. `--set base.max_steps=10`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_posvariants.evaluation.compare import load_recipe, rewrite_report, run_compare
from hf_posvariants.training.recipes import load_yaml


def apply_override(recipe: dict, assignment: str) -> None:
    path, _, value = assignment.partition("=")
    *parents, key = path.split(".")
    node = recipe
    for parent in parents:
        node = node.setdefault(parent, {})
    node[key] = load_yaml(value, f"--set {path}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from compare.json")
    parser.add_argument("--root", type=Path, default=Path("."), help="directory the recipe's paths are relative to")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    for assignment in args.set:
        apply_override(recipe, assignment)
    if args.report_only:
        rewrite_report(args.root / recipe["output_dir"])
        print((args.root / recipe["output_dir"] / "compare.md").read_text())
        return {}
    results = run_compare(recipe, args.root)
    print((args.root / recipe["output_dir"] / "compare.md").read_text())
    return results


if __name__ == "__main__":
    main()
