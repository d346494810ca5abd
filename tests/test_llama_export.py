"""Export to plain Llama: the same logits and greedy tokens from a folder that loads without this package and
without remote code, and a clear refusal of every configuration that is not exactly a Llama."""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, LlamaConfig, LlamaForCausalLM

from hf_posvariants import PosVarDebertaConfig, PosVarDiffConfig, PosVarLlamaConfig, PosVarTransformerConfig
from hf_posvariants.conversion import check_exportable, convert_to_llama, export_llama
from hf_posvariants.evaluation.data import byte_tokenizer
from hf_posvariants.training.run_folder import LOCK_FILE, RunLock
from tests.conftest import ENCODINGS, VOCAB, build, tiny_config
from tests.test_export import run_without
from tests.test_hub import TOKEN, RecordingHub, hub  # noqa: F401  (fixture)
from tests.test_training import ROOT

PROMPTS = [[5, 9, 3, 7, 11, 4], [4, 4, 8, 6, 6, 3]]
# transformers' RoPE scalings, each with the keys it needs.
ROPE_SCALINGS = {
    "default": {"rope_type": "default", "rope_theta": 10_000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10_000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "rope_theta": 10_000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
                 "long_factor": [1.5, 2.0, 3.0, 4.0], "original_max_position_embeddings": 16},
}  # fmt: skip
# posvar_transformer with Llama's block is a Llama too.
LLAMA_BLOCK_OVERRIDES = dict(position_encoding="rope", norm_type="rmsnorm", norm_position="pre", mlp_type="gated",
                             scale_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False)

# Fresh interpreter, hf_posvariants blocked, no trust_remote_code: logits and greedy tokens of each folder.
PLAIN_LOADER = """
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folders, prompts, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
results = {}
for folder in folders:
    assert not any(name.endswith(".py") for name in __import__("os").listdir(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert type(model) is transformers.LlamaForCausalLM, type(model)
    AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        results[folder] = (model(prompts).logits, model.generate(prompts, max_new_tokens=12, do_sample=False))
assert "hf_posvariants" not in sys.modules
torch.save(results, out)
"""


def save_source(model, folder) -> str:
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def test_exported_llama_loads_without_the_package_with_the_same_logits_and_tokens(tmp_path):
    sources = {
        "yarn_tied": tiny_config(PosVarLlamaConfig, "rope", rope_parameters=dict(ROPE_SCALINGS["yarn"]),
                                 tie_word_embeddings=True),
        "posvar_transformer": tiny_config(PosVarTransformerConfig, **LLAMA_BLOCK_OVERRIDES),
    }  # fmt: skip
    prompts, expected, folders = torch.tensor(PROMPTS), {}, []
    for name, config in sources.items():
        model = build(AutoModelForCausalLM, config)
        folder = str(export_llama(save_source(model, tmp_path / name), tmp_path / f"{name}-llama"))
        with torch.no_grad():
            expected[folder] = (model(prompts).logits, model.generate(prompts, max_new_tokens=12, do_sample=False))
        saved = json.loads(open(f"{folder}/config.json").read())
        assert saved["model_type"] == "llama" and "auto_map" not in saved
        folders.append(folder)
    result = run_without("hf_posvariants", PLAIN_LOADER, json.dumps(folders), json.dumps(PROMPTS),
                         str(tmp_path / "out.pt"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt")
    for folder in folders:
        (logits, tokens), (want_logits, want_tokens) = loaded[folder], expected[folder]
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=0, msg=folder)
        assert torch.equal(tokens, want_tokens), folder
        assert tokens.shape[1] == len(PROMPTS[0]) + 12


@pytest.mark.parametrize("rope", ROPE_SCALINGS)
def test_every_rope_scaling_converts_to_the_same_logits_and_tokens(rope):
    prompts = torch.tensor(PROMPTS)
    config = tiny_config(PosVarLlamaConfig, "rope", rope_parameters=dict(ROPE_SCALINGS[rope]), num_key_value_heads=1,
                         attention_bias=True, mlp_bias=True)  # fmt: skip
    model = build(AutoModelForCausalLM, config)
    llama = convert_to_llama(model)
    assert type(llama) is LlamaForCausalLM and llama.config.rope_parameters == model.config.rope_parameters
    with torch.no_grad():
        # 70 tokens: past max_position_embeddings (64), where dynamic and longrope switch to their long regime.
        long_prompt = torch.randint(3, VOCAB, (1, 70))
        torch.testing.assert_close(llama(long_prompt).logits, model(long_prompt).logits, rtol=0, atol=0)
        generated = model.generate(prompts, max_new_tokens=12, do_sample=False)
        assert torch.equal(llama.generate(prompts, max_new_tokens=12, do_sample=False), generated)


def test_converted_model_matches_on_every_backend_and_dtype():
    prompts = torch.tensor(PROMPTS)
    for implementation in ("eager", "sdpa"):
        for dtype in (torch.float32, torch.bfloat16):
            model = build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope"), implementation).to(dtype)
            llama = convert_to_llama(model)
            llama.set_attn_implementation(implementation)
            assert llama.dtype == dtype
            with torch.no_grad():
                torch.testing.assert_close(llama(prompts).logits, model(prompts).logits, rtol=0, atol=0)


NOT_LLAMA = [
    *[(PosVarLlamaConfig, {"position_encoding": name}, f"position_encoding={name!r}")
      for name in ENCODINGS if name != "rope"],
    (PosVarLlamaConfig, {"layer_position_encodings": ["rope", "nope"]}, "layer_position_encodings=['rope', 'nope']"),
    (PosVarLlamaConfig, {"norm_type": "layernorm"}, "norm_type='layernorm'"),
    (PosVarLlamaConfig, {"norm_position": "post"}, "norm_position='post'"),
    (PosVarLlamaConfig, {"mlp_type": "standard"}, "mlp_type='standard'"),
    (PosVarLlamaConfig, {"scale_embeddings": True}, "scale_embeddings=True"),
    (PosVarLlamaConfig, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor']=0.5"),
    (PosVarDiffConfig, {}, "attention_variant='differential'"),
    (PosVarDebertaConfig, {"num_key_value_heads": 4}, "attention_variant='disentangled'"),
    (PosVarTransformerConfig, {}, "position_encoding='sinusoidal'"),
]  # fmt: skip


@pytest.mark.parametrize("config_class, overrides, named", NOT_LLAMA, ids=[case[2] for case in NOT_LLAMA])
def test_what_is_not_exactly_a_llama_is_refused_naming_the_field(config_class, overrides, named):
    fields = {"position_encoding": config_class().position_encoding, **overrides}
    config = tiny_config(config_class, fields.pop("position_encoding"), **fields)
    with pytest.raises(ValueError, match="not exactly a Llama") as refusal:
        check_exportable(config)
    assert named in str(refusal.value) and "a Llama has" in str(refusal.value)


def test_a_field_without_llama_counterpart_is_refused(monkeypatch):
    config = tiny_config(PosVarLlamaConfig, "rope")
    monkeypatch.setattr(config, "hidden_dropout", 0.1)  # acts in training only: still a Llama
    check_exportable(config)
    deberta = tiny_config(PosVarDebertaConfig, "nope", num_key_value_heads=4, emd_layers=2)
    with pytest.raises(ValueError, match="emd_layers=2 \\(no Llama equivalent\\)"):
        check_exportable(deberta)


def test_a_config_of_another_library_is_refused():
    with pytest.raises(ValueError, match="model_type='llama' is not a posvariants model"):
        check_exportable(LlamaConfig())


def test_a_masked_lm_folder_is_refused_before_its_weights_are_read(tmp_path):
    folder = save_source(build(AutoModelForMaskedLM, tiny_config(PosVarLlamaConfig, "rope")), tmp_path / "mlm")
    (tmp_path / "mlm" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="architectures=\\['PosVarLlamaForMaskedLM'\\]"):
        export_llama(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_script_writes_a_llama_folder_or_refuses(tmp_path, capsys):
    source = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), tmp_path / "rope")
    script = runpy.run_path(str(ROOT / "scripts" / "export_llama.py"))
    assert script["main"]([source, str(tmp_path / "rope-llama")]) == 0
    assert json.loads((tmp_path / "rope-llama" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    alibi = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "alibi")), tmp_path / "alibi")
    assert script["main"]([alibi, str(tmp_path / "alibi-llama")]) == 2
    assert "position_encoding='alibi' (a Llama has 'rope')" in capsys.readouterr().err


def test_push_as_llama_sends_the_plain_llama_folder_with_its_card(tmp_path, hub, capsys, monkeypatch):
    source = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), tmp_path / "run")
    (tmp_path / "run" / "run_args.json").write_text(json.dumps({"objective": "clm", "block_size": 32}))
    script = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"))
    monkeypatch.setitem(script["main"].__globals__, "HfApi", RecordingHub)
    listed = script["main"]([source, "someone/tiny-llama", "--as-llama", "--dry_run"])
    out = capsys.readouterr().out
    assert not hub.instances and "LlamaForCausalLM" in out and "trust_remote_code" not in out.split("---", 2)[2]
    sent = script["main"]([source, "someone/tiny-llama", "--as-llama", "--token", TOKEN])
    files = hub.instances[0].commits[0]["files"]
    assert sorted(listed) == sorted(sent) == sorted(files)
    assert not any(path.endswith(".py") for path in files) and "run_args.json" in files
    assert json.loads(files["config.json"])["model_type"] == "llama"
    card = files["README.md"].decode()
    assert "trust_remote_code" not in card and "- llama" in card and "custom_code" not in card
    assert "| `model_type` | `llama` |" in card  # as its config.json says
    assert not (tmp_path / "run" / "README.md").exists()  # the trained folder is left as it was


def export_script(*argv: str, cwd, before: str = "", script: str = "export_llama.py") -> subprocess.CompletedProcess:
    """scripts/`script` (export_llama.py unless told) in a fresh process; `before` runs first (a fault to inject)."""
    code = f"import runpy, sys\n{textwrap.dedent(before)}\nsys.argv = [{script!r}, *sys.argv[1:]]\n" \
           f"runpy.run_path({str(ROOT / 'scripts' / script)!r}, run_name='__main__')"  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


# The export process kills itself (SIGKILL) once the weights are written, as the tokenizer is about to be.
KILLED_AFTER_THE_WEIGHTS = """
import os, signal
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
PreTrainedTokenizerBase.save_pretrained = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
"""


def folder_files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_an_export_killed_halfway_leaves_no_half_written_folder(tmp_path, caplog):
    source = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), tmp_path / "run")
    killed = export_script(source, str(tmp_path / "out"), cwd=tmp_path, before=KILLED_AFTER_THE_WEIGHTS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # not a config and weights without their tokenizer, loadable as if whole
    partial = tmp_path / ".out.partial"
    assert {"config.json", "model.safetensors", LOCK_FILE} <= set(folder_files(partial))  # the kill's leftover
    (partial / "stale.bin").write_bytes(b"stale")
    with caplog.at_level(logging.WARNING, logger="hf_posvariants"):
        export_llama(source, tmp_path / "out")  # the same command again: the kill's leftover is replaced, and said so
    said = [record.getMessage() for record in caplog.records if "left by a write of" in record.getMessage()]
    assert len(said) == 1, said
    partial_name, out_name = (re.escape(str(path)) for path in (partial, tmp_path / "out"))
    assert re.fullmatch(rf"Removing {partial_name}, left by a write of {out_name} that was killed \(pid \d+ on \S+, "
                        r"export_llama\.py, started [-\d: ]+ UTC\); writing it afresh\.", said[0]), said[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "run"]
    assert not {"stale.bin", LOCK_FILE} & set(folder_files(tmp_path / "out"))
    assert "tokenizer_config.json" in folder_files(tmp_path / "out")


def test_an_export_removes_no_partial_folder_it_cannot_prove_its_own(tmp_path):
    """A `.OUT.partial` without the lock file a write creates first is not ours (refused, left as it is); one whose
    lock a live process holds is being written (refused too)."""
    source = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), tmp_path / "run")
    partial, out = tmp_path / ".out.partial", tmp_path / "out"
    partial_name, out_name = re.escape(str(partial)), re.escape(str(out))
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / LOCK_FILE).write_text("")
    for case in ("a folder", "a link"):
        with pytest.raises(ValueError, match=rf"{partial_name} is in the way of writing {out_name}, and is no partial "
                                             rf"folder this package left \(a folder, not a link, holding its "
                                             rf"{re.escape(LOCK_FILE)}\)"):  # fmt: skip
            export_llama(source, out)
        assert not out.exists(), case
        if case == "a folder":
            assert folder_files(partial) == {"notes.txt": b"mine"}
            shutil.rmtree(partial)
            partial.symlink_to(tmp_path / "elsewhere")
    assert folder_files(tmp_path / "elsewhere") == {LOCK_FILE: b""}
    partial.unlink()
    live = RunLock(partial).acquire()  # a write in progress (here this process, through another open file)
    try:
        with pytest.raises(ValueError, match=rf"{out_name} is being written by another process \(pid {os.getpid()} "):
            export_llama(source, out)
        assert sorted(folder_files(partial)) == [LOCK_FILE] and not out.exists()
    finally:
        live.release()
    export_llama(source, out)  # its writer gone, the leftover is ours to replace
    assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere", "out", "run"]


def test_an_overwrite_killed_halfway_keeps_the_earlier_export(tmp_path):
    source = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), tmp_path / "run")
    whole = folder_files(export_llama(source, tmp_path / "out"))
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(whole)
    killed = export_script(source, str(tmp_path / "out"), "--overwrite", cwd=tmp_path, before=KILLED_AFTER_THE_WEIGHTS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert folder_files(tmp_path / "out") == whole
    assert folder_files(export_llama(source, tmp_path / "out", overwrite=True)) == whole
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "run"]


def test_export_replaces_an_earlier_export_only_when_told_and_never_a_users_folder(tmp_path, capsys):
    source = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), tmp_path / "run")
    script = runpy.run_path(str(ROOT / "scripts" / "export_llama.py"))
    out = str(tmp_path / "out")
    assert script["main"]([source, out]) == 0
    assert script["main"]([source, out]) == 2  # the same command twice
    assert "already holds a model (config.json, generation_config.json, " in capsys.readouterr().err
    (tmp_path / "out" / "model.safetensors").write_bytes(b"stale")
    assert script["main"]([source, out, "--overwrite"]) == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != b"stale"
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("{}")
    for extra in ([], ["--overwrite"]):
        assert script["main"]([source, str(mine), *extra]) == 2
        assert "holds more than model files (data, notes.txt): a conversion never replaces it" in capsys.readouterr().err
    assert sorted(path.name for path in mine.iterdir()) == ["config.json", "data", "notes.txt"]
    assert (mine / "config.json").read_text() == "{}"
    (tmp_path / "empty").mkdir()
    assert script["main"]([source, str(tmp_path / "empty")]) == 0


def test_export_never_writes_over_its_source(tmp_path, capsys):
    run = tmp_path / "run"
    source = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), run)
    before = folder_files(run)
    script = runpy.run_path(str(ROOT / "scripts" / "export_llama.py"))
    for output in (source, str(tmp_path), f"{source}/../run/"):
        assert script["main"]([source, output, "--overwrite"]) == 2
        assert "is (or holds) the source folder" in capsys.readouterr().err
    assert folder_files(run) == before


def test_export_names_a_source_that_holds_no_model(tmp_path, capsys):
    script = runpy.run_path(str(ROOT / "scripts" / "export_llama.py"))
    assert script["main"]([str(tmp_path / "typo"), str(tmp_path / "out")]) == 2
    assert f"source={str(tmp_path / 'typo')!r} is not a folder" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"  # a run killed before its end: only checkpoints hold a model
    save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), unfinished / "checkpoint-20")
    (unfinished / "checkpoint-10").mkdir()
    assert script["main"]([str(unfinished), str(tmp_path / "out")]) == 2
    assert "holds no saved model (no config.json" in (err := capsys.readouterr().err)
    assert "['checkpoint-10', 'checkpoint-20']" in err
    assert script["main"]([str(unfinished / "checkpoint-20"), str(tmp_path / "out")]) == 0
    push = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"))["main"]
    for extra in ([], ["--as-llama"]):
        with pytest.raises(ValueError, match=r"folder=.* holds no saved model .*\['checkpoint-10', 'checkpoint-20'\]"):
            push([str(unfinished), "someone/tiny", "--dry_run", *extra])
        with pytest.raises(ValueError, match="folder=.* is not a folder"):
            push([str(tmp_path / "typo"), "someone/tiny", "--dry_run", *extra])


def test_pushing_an_exported_llama_folder_itself_is_refused_by_name(tmp_path, hub, monkeypatch):
    source = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), tmp_path / "run")
    exported = str(export_llama(source, tmp_path / "llama"))
    script = runpy.run_path(str(ROOT / "scripts" / "push_to_hub.py"))
    monkeypatch.setitem(script["main"].__globals__, "HfApi", RecordingHub)
    for extra in (["--dry_run"], ["--token", TOKEN]):
        with pytest.raises(ValueError, match="model_type='llama', not a posvariants model .*--as-llama"):
            script["main"]([exported, "someone/tiny-llama", *extra])
    assert not hub.instances and "README.md" not in folder_files(tmp_path / "llama")


def test_a_tokenizer_that_does_not_load_stops_the_export_and_a_missing_one_is_named(tmp_path):
    run = tmp_path / "run"
    source = save_source(build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope")), run)
    (run / "tokenizer_config.json").write_text((run / "tokenizer_config.json").read_text()[:40])  # cut short
    with pytest.raises(ValueError, match="the tokenizer in .* does not load"):
        export_llama(source, tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        (run / name).unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="holds no tokenizer, so the export has the weights alone"):
        export_llama(source, tmp_path / "out")
    assert {"config.json", "model.safetensors"} <= set(folder_files(tmp_path / "out"))
