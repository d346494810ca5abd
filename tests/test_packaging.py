"""The package as users install it: a built wheel (not this checkout) carries what the code reads at run time, and
the test suite collects with only the `dev` extra."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from hf_posvariants import PosVarLlamaConfig
from tests.conftest import build, tiny_config
from tests.test_export import run_without
from tests.test_training import ROOT

# Runs from the wheel's install folder: the card renders from the installed template.
RENDER_FROM_WHEEL = """
import hf_posvariants
from hf_posvariants.training.hub import TEMPLATE, render_model_card
target, folder = sys.argv[1], sys.argv[2]
assert hf_posvariants.__file__.startswith(target), hf_posvariants.__file__
assert str(TEMPLATE).startswith(target) and TEMPLATE.is_file(), TEMPLATE
card = render_model_card(folder, "someone/tiny")
assert "## Usage" in card.content and "someone/tiny" in card.content, card.content
"""


def test_a_wheel_install_carries_the_model_card_template(tmp_path):
    """Build the wheel from a copy of the sources (no stale build/ folder), install it into a bare target folder
    and render a card from there: a file missing from the package data fails here, not at a user's first push."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "hf_posvariants", source / "hf_posvariants", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"),
                    str(source)], check=True, cwd=tmp_path, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("hf_posvariants-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path, timeout=300)  # fmt: skip
    folder = tmp_path / "model"
    build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")).save_pretrained(folder)
    (folder / "run_args.json").write_text(json.dumps({"objective": "clm", "block_size": 32}))
    # matplotlib is blocked, which the wheel's core must not need either.
    result = run_without("matplotlib", RENDER_FROM_WHEEL, str(target), str(folder), cwd=tmp_path,
                         pythonpath=str(target))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


COLLECT = """
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-m", "", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


def test_the_context_extension_tests_collect_without_matplotlib():
    """matplotlib is the `plots` extra; with only `dev` installed, the tests that plot skip and the rest run."""
    result = run_without("matplotlib", COLLECT, "tests/test_context_extension.py", cwd=ROOT, pythonpath=str(ROOT))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "test_extension_study_compares_rescalings" in result.stdout


def test_push_dry_run_renders_the_card(tmp_path, capsys):
    """A dry run renders the card a push would upload, so a missing or broken template fails there."""
    folder = tmp_path / "model"
    build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")).save_pretrained(folder)
    script = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"))
    script["main"]([str(folder), "someone/tiny", "--dry_run"])
    out = capsys.readouterr().out
    assert "--- README.md ---" in out and 'from_pretrained("someone/tiny", trust_remote_code=True)' in out
    with pytest.raises(FileNotFoundError):
        script["main"]([str(folder), "someone/tiny", "--dry_run", "--template", str(tmp_path / "missing.md")])
