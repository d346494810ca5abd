"""Remote-code export: a folder that loads with trust_remote_code=True where hf_posvariants cannot be imported."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap

import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from hf_posvariants import FAMILIES, PosVarDebertaConfig

from hf_posvariants.training.export import export_for_remote_code, family_auto_map
from tests.conftest import FAMILY_CONFIGS as LM_FAMILIES  # families with both LM heads; DeBERTa: test_deberta.py
from tests.conftest import build, tiny_config


def import_blocker(package: str) -> str:
    """The head of a script for a fresh interpreter in which `import package` fails (and is proved to fail),
    although the package is installed in the environment running the tests."""
    return textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        class Blocked(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == {package!r} or name.startswith({package + "."!r}):
                    raise ModuleNotFoundError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Blocked())
        try:
            import {package}
            sys.exit("{package} was importable")
        except ModuleNotFoundError:
            pass
        """
    )


def run_without(
    package: str, script: str, *args: str, cwd, pythonpath: str | None = None
) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter, offline, where `package` cannot be imported; PYTHONPATH is `pythonpath`
    (by default none: the tests' own is dropped)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", import_blocker(package) + textwrap.dedent(script), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


# Every family loads from its folder with remote code.
LOADER = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM
    folders, input_ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
    logits = {}
    for folder in folders:
        masked = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
        assert type(masked).__module__.startswith("transformers_modules"), type(masked).__module__
        assert "hf_posvariants" not in sys.modules
        with torch.no_grad():
            logits[folder] = (masked(input_ids).logits, base(input_ids).last_hidden_state)
    torch.save(logits, out)
    """
)


def test_auto_map_names_every_head_of_the_family():
    for config_class, heads in FAMILIES.items():
        auto_map = family_auto_map(config_class)
        assert set(auto_map) == {"AutoConfig", *(auto_class.__name__ for auto_class in heads)}
        assert auto_map["AutoConfig"] == f"{config_class.__module__.rsplit('.', 1)[-1]}.{config_class.__name__}"


def test_export_loads_without_the_package(tmp_path):
    input_ids = [[5, 9, 3, 7, 11, 2], [4, 4, 8, 1, 6, 3]]
    expected, folders = {}, []
    for config_class in LM_FAMILIES:
        config = tiny_config(config_class, config_class().position_encoding)
        model = build(AutoModelForMaskedLM, config)
        folder = str(tmp_path / config_class.model_type)
        export_for_remote_code(model, folder)
        saved = json.loads(open(os.path.join(folder, "config.json")).read())
        assert saved["auto_map"] == family_auto_map(config_class)
        # The bare model follows config.is_decoder (causal for Llama), unlike the always-bidirectional MLM head.
        base = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            expected[folder] = (model(torch.tensor(input_ids)).logits, base(torch.tensor(input_ids)).last_hidden_state)
        folders.append(folder)
    out = str(tmp_path / "logits.pt")
    result = run_without("hf_posvariants", LOADER, json.dumps(folders), json.dumps(input_ids), out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(out)
    for folder in folders:
        for got, want in zip(loaded[folder], expected[folder]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_export_serves_classification_heads(tmp_path):
    """The same folder, exported from a masked LM, fine-tunes as a classifier through the full auto_map."""
    for config_class in LM_FAMILIES:
        folder = tmp_path / config_class.model_type
        export_for_remote_code(build(AutoModelForMaskedLM, tiny_config(config_class, "nope")), folder)
        classifier = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
        assert classifier.score.out_features == 3
        assert isinstance(AutoModel.from_pretrained(folder), FAMILIES[config_class][AutoModel])


def third_party_imports(source: str) -> set[str]:
    """Top-level packages a module imports, leaving out the standard library and same-folder imports."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return {root for root in roots if root not in sys.stdlib_module_names and root != "__future__"}


def test_exported_files_import_what_their_docstrings_say(tmp_path):
    """Each flat file states which packages it needs ("imports only torch and transformers"); the claim holds."""
    for config_class in FAMILIES:
        config_fields = dict(num_key_value_heads=4, position_buckets=8) if config_class is PosVarDebertaConfig else {}
        folder = tmp_path / config_class.model_type
        export_for_remote_code(build(AutoModel, tiny_config(config_class, "nope", **config_fields)), folder)
        for path in sorted(folder.glob("*.py")):
            source = path.read_text()
            claim = re.search(r"imports only ([\w ,]+)", ast.get_docstring(ast.parse(source)) or "")
            assert claim, f"{path.name} does not say what it imports"
            allowed = set(re.findall(r"\w+", claim.group(1))) - {"and"}
            assert third_party_imports(source) <= allowed, (path.name, third_party_imports(source), allowed)
