"""Every converter writes its output folder the same way (`conversion.output`): a new or empty folder as before, an
earlier conversion replaced only with --overwrite, never a folder of the user's, the source or the current working
directory, and never half a folder after a kill."""

from __future__ import annotations

import runpy
import shutil
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DebertaV2ForMaskedLM, LlamaConfig, LlamaForCausalLM

from hf_posvariants import PosVarLlamaConfig
from hf_posvariants.conversion import convert_llama_checkpoint
from hf_posvariants.evaluation.data import byte_tokenizer
from hf_posvariants.evaluation.extension import extend
from tests.conftest import VOCAB, build, tiny_config
from tests.test_deberta import randomise, reference_config
from tests.test_differential import random_diffllama
from tests.test_llama_export import KILLED_AFTER_THE_WEIGHTS, export_script, folder_files
from tests.test_training import ROOT


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))  # fmt: skip


# Converter → the model its source folder holds.
SOURCES = {
    "export_llama": lambda: build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")),
    "convert_deberta": lambda: randomise(DebertaV2ForMaskedLM(reference_config(["c2p", "p2c"], True, 8))),
    "convert_diffllama": lambda: random_diffllama("eager"),
    "convert_llama_checkpoint": tiny_llama,
}


def make_source(name: str, folder: Path) -> Path:
    SOURCES[name]().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def convert(name: str, source: Path, output: Path | str, *flags: str, capsys) -> tuple[int, str]:
    """Run converter `name` (its script, or the library function the extension calls): the exit code (2: refused)
    and the refusal."""
    if name == "convert_llama_checkpoint":
        try:
            convert_llama_checkpoint(source, output, overwrite="--overwrite" in flags)
        except ValueError as error:
            return 2, str(error)
        return 0, ""
    code = runpy.run_path(str(ROOT / "scripts" / f"{name}.py"))["main"]([str(source), str(output), *flags])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", SOURCES)
def test_a_folder_holding_files_is_refused_and_left_as_it_was(name, tmp_path, capsys):
    source = make_source(name, tmp_path / "source")
    (tmp_path / "empty").mkdir()
    assert convert(name, source, tmp_path / "empty", capsys=capsys)[0] == 0  # a new or empty folder, as before
    out = tmp_path / "out"
    assert convert(name, source, out, capsys=capsys)[0] == 0
    earlier = folder_files(out)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(earlier)
    code, refusal = convert(name, source, out, capsys=capsys)
    assert code == 2 and f"output={str(out)!r} already holds a model (" in refusal
    assert "--overwrite" in refusal and folder_files(out) == earlier
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        code, refusal = convert(name, source, mine, *flags, capsys=capsys)
        assert code == 2 and "holds more than model files (notes.txt): a conversion never replaces it" in refusal
    assert folder_files(mine) == {"config.json": b"{}", "notes.txt": b"mine"}
    (tmp_path / "file").write_text("mine")
    code, refusal = convert(name, source, tmp_path / "file", "--overwrite", capsys=capsys)
    assert code == 2 and "is a file, not a folder" in refusal and (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("name", SOURCES)
def test_overwrite_replaces_an_earlier_conversion(name, tmp_path, capsys):
    source, out = make_source(name, tmp_path / "source"), tmp_path / "out"
    assert convert(name, source, out, capsys=capsys)[0] == 0
    whole = folder_files(out)
    (out / "model.safetensors").write_bytes(b"stale")
    (out / "tokenizer_config.json").unlink()
    assert convert(name, source, out, "--overwrite", capsys=capsys)[0] == 0
    assert folder_files(out) == whole
    AutoConfig.from_pretrained(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "source"]  # no partial or old folder left


@pytest.mark.parametrize("name", SOURCES)
def test_the_current_directory_is_never_replaced(name, tmp_path, capsys, monkeypatch):
    source, out = make_source(name, tmp_path / "source"), tmp_path / "out"
    assert convert(name, source, out, capsys=capsys)[0] == 0
    earlier = folder_files(out)
    monkeypatch.chdir(out)
    for output in (".", out):
        code, refusal = convert(name, source, output, "--overwrite", capsys=capsys)
        assert code == 2 and f"output={str(output)!r} is (or holds) the current working directory" in refusal
    assert folder_files(out) == earlier
    (tmp_path / "work" / "inner").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "inner")
    for output in ("..", tmp_path / "work"):
        code, refusal = convert(name, source, output, "--overwrite", capsys=capsys)
        assert code == 2 and "is (or holds) the current working directory" in refusal
    assert (tmp_path / "work" / "inner").is_dir()


def test_a_conversion_killed_halfway_keeps_the_earlier_one(tmp_path, capsys):
    """The export's kill (tests/test_llama_export.py) in another converter's process: the earlier folder stays."""
    source, out = make_source("convert_deberta", tmp_path / "source"), tmp_path / "out"
    assert convert("convert_deberta", source, out, capsys=capsys)[0] == 0
    whole = folder_files(out)
    killed = export_script(str(source), str(out), "--overwrite", cwd=tmp_path, before=KILLED_AFTER_THE_WEIGHTS,
                           script="convert_deberta.py")  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert folder_files(out) == whole
    assert convert("convert_deberta", source, out, "--overwrite", capsys=capsys)[0] == 0  # the kill's leftover goes
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "source"]


def test_an_extension_refuses_an_earlier_ones_folders_before_any_work(tmp_path):
    source, out_dir = make_source("convert_llama_checkpoint", tmp_path / "llama"), tmp_path / "extend"
    convert_llama_checkpoint(source, out_dir / "converted")
    shutil.copytree(out_dir / "converted", out_dir / "changed")
    before = {folder: folder_files(out_dir / folder) for folder in ("converted", "changed")}
    with pytest.raises(ValueError, match=r"out_dir=.*changed' already holds a model .*--overwrite"):
        extend(source, ROOT / "configs" / "extend" / "tiny_llama.yaml", 4.0, out_dir)
    assert {folder: folder_files(out_dir / folder) for folder in ("converted", "changed")} == before
    assert sorted(path.name for path in out_dir.iterdir()) == ["changed", "converted"]
