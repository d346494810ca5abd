"""Context extension: Llama → posvar_llama conversion, the four RoPE rescalings, refusals, and the one
command end to end on a tiny locally pretrained LlamaForCausalLM."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_posvariants import PosVarLlamaConfig
from hf_posvariants.conversion.llama import convert_llama_checkpoint, convert_llama_config
from hf_posvariants.evaluation.extension import extend_config
from hf_posvariants.evaluation.length import ROPE_SCALINGS, scaled_rope_parameters
from hf_posvariants.evaluation.data import byte_tokenizer
from hf_posvariants.training import pipeline
from test_training import _one_thread  # noqa: F401  (autouse: tiny models run fastest on one thread)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import extend_context  # noqa: E402


def llama_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    fields.update(overrides)
    return LlamaConfig(**fields)


def test_converted_llama_computes_the_same_logits(tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config()).eval()
    llama.save_pretrained(tmp_path / "llama")
    byte_tokenizer().save_pretrained(tmp_path / "llama")
    config = convert_llama_checkpoint(tmp_path / "llama", tmp_path / "ours")
    assert config.model_type == "posvar_llama" and config.norm_eps == 1e-6
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, llama(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert (tmp_path / "ours" / "tokenizer_config.json").exists()


@pytest.mark.parametrize("rope_type", ROPE_SCALINGS)
def test_each_rescaling_matches_transformers_llama_at_four_times_the_length(rope_type):
    parameters = scaled_rope_parameters({"rope_type": "default", "rope_theta": 10_000.0}, rope_type, 4.0, 16)
    length = 16 if rope_type == "dynamic" else 64
    llama = LlamaForCausalLM(llama_config(rope_parameters=dict(parameters), max_position_embeddings=length)).eval()
    ours = AutoModelForCausalLM.from_config(convert_llama_config(llama.config), attn_implementation="eager").eval()
    ours.load_state_dict(llama.state_dict(), strict=True)
    ids = torch.randint(3, VOCAB, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, llama(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_linear_scaling_is_position_interpolation():
    # Chen et al. 2023: position n of the extended model is position n / factor of the original.
    scaled = PosVarLlamaConfig(**dict(hidden_size=32, num_attention_heads=4),
                               rope_parameters=scaled_rope_parameters({"rope_theta": 10_000.0}, "linear", 4.0, 16))
    plain = PosVarLlamaConfig(hidden_size=32, num_attention_heads=4)
    scaled_model, plain_model = AutoModelForCausalLM.from_config(scaled), AutoModelForCausalLM.from_config(plain)
    at = torch.tensor([[8, 20, 60]])
    cos_scaled, _ = scaled_model.model.position_encoding.rotary_embeddings(torch.zeros(1), at)
    cos_plain, _ = plain_model.model.position_encoding.rotary_embeddings(torch.zeros(1), at.float() / 4)
    torch.testing.assert_close(cos_scaled, cos_plain)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(("ntk", 4.0), "rope_scaling='ntk'.*'yarn'"), (("yarn", 1.0), "factor=1.0 must exceed 1")],
)
def test_bad_rescalings_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        scaled_rope_parameters({"rope_theta": 10_000.0}, *arguments, 16)


def test_only_rotary_checkpoints_are_rescaled(tmp_path):
    AutoModelForCausalLM.from_config(tiny_config(PosVarLlamaConfig, "alibi")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="position_encoding='alibi'.*'rope'"):
        extend_config(tmp_path, 4.0, rope_type="yarn")


@pytest.mark.parametrize(
    ("change", "message"),
    [(dict(encoding="learned"), "encoding='learned' is not supported"), (dict(), "exactly one"),
     (dict(rope_type="yarn", encoding="alibi"), "exactly one")],
)
def test_encoding_switches_are_checked(tmp_path, change, message):
    AutoModelForCausalLM.from_config(tiny_config(PosVarLlamaConfig, "rope")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        extend_config(tmp_path, 4.0, **change)


def pretrain_llama(folder: Path) -> None:
    """A tiny decoder pretrained at 32 tokens by the pipeline, then saved as transformers' LlamaForCausalLM."""
    posvar = folder.parent / "posvar_pretrained"
    pipeline.main([
        str(ROOT / "configs" / "tiny_clm.yaml"), "--output_dir", str(posvar), "--builtin_examples", "4000",
        "--block_size", "32", "--max_steps", "250", "--learning_rate", "0.003", "--warmup_steps", "10",
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "50", "--disable_tqdm", "true",
        "--model.max_position_embeddings", "32", "--model.intermediate_size", "128",
    ])  # fmt: skip
    ours = AutoModelForCausalLM.from_pretrained(posvar)
    c = ours.config
    llama = LlamaForCausalLM(llama_config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    ))  # fmt: skip
    llama.load_state_dict(ours.state_dict(), strict=True)
    llama.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (posvar / name).exists():
            (folder / name).write_bytes((posvar / name).read_bytes())


@pytest.fixture(scope="module")
def pretrained_llama(tmp_path_factory) -> tuple[Path, float]:
    """(folder, seconds it took) of the tiny LlamaForCausalLM pretrained at 32 tokens."""
    start = time.perf_counter()
    folder = tmp_path_factory.mktemp("pretrained") / "llama"
    pretrain_llama(folder)
    return folder, time.perf_counter() - start


def test_extension_command_end_to_end(tmp_path, pretrained_llama):
    """The README's command on a tiny Llama pretrained at 32 tokens: perplexity at 128 falls after extension."""
    llama, pretraining_seconds = pretrained_llama
    start = time.perf_counter()
    assert AutoConfig.from_pretrained(llama).model_type == "llama"
    out = tmp_path / "extend"
    report = extend_context.main([str(llama), str(ROOT / "configs" / "extend" / "tiny_llama.yaml"),
                                  "--rope-scaling", "yarn", "--factor", "4", "--out-dir", str(out),
                                  "--eval-tokens", "4096"])  # fmt: skip
    elapsed = pretraining_seconds + time.perf_counter() - start
    stages, stage_names = list(report["perplexity"].values()), list(report["perplexity"])
    as_trained, fine_tuned = stages[0], stages[-1]
    assert fine_tuned[128] < as_trained[128], report["perplexity"]
    assert json.loads((out / "extension.json").read_text())["extended_length"] == 128
    assert set(report["probes"]) == set(report["perplexity"]) and "copy @ 128" in report["probes"][stage_names[-1]]
    extended = AutoConfig.from_pretrained(out / "extended")
    assert extended.rope_parameters["rope_type"] == "yarn" and extended.max_position_embeddings == 128
    print(f"end to end: {elapsed:.1f} s; perplexity {report['perplexity']}")
    assert elapsed < 120


@pytest.mark.slow
def test_extension_study_compares_rescalings(tmp_path, pretrained_llama):
    pytest.importorskip("matplotlib")  # the study plots: the `plots` extra
    import extension_study

    llama, _ = pretrained_llama
    reports = extension_study.main([str(llama), str(ROOT / "configs" / "extend" / "tiny_llama.yaml"),
                                    "--scalings", "linear", "dynamic", "--work-dir", str(tmp_path / "work"),
                                    "--out-dir", str(tmp_path / "out"), "--eval-tokens", "2048",
                                    "--probe-examples", "2", "--max_steps", "40"])  # fmt: skip
    table = (tmp_path / "out" / "study.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["as trained (no rescaling)", "PI (linear)", "dynamic NTK"]
    after = float(table[3].split("|")[5])  # PI's perplexity at 128 after fine-tuning, as in its report
    assert after == pytest.approx(list(reports["linear"]["perplexity"].values())[2][128], abs=1e-3)
    assert (tmp_path / "out" / "perplexity.png").stat().st_size > 0


def test_extension_by_switching_the_encoding(tmp_path, pretrained_llama):
    llama, _ = pretrained_llama
    argv = [str(llama), str(ROOT / "configs" / "extend" / "tiny_llama.yaml"), "--encoding", "alibi", "--out-dir",
            str(tmp_path), "--eval-tokens", "2048", "--probe-examples", "0", "--max_steps", "60"]  # fmt: skip
    report = extend_context.main(argv)
    switched, fine_tuned = list(report["perplexity"].values())[1:]
    assert fine_tuned[128] < switched[128]  # the fine-tune learns the new encoding
    config = AutoConfig.from_pretrained(tmp_path / "extended")
    assert config.position_encoding == "alibi" and config.max_position_embeddings == 128
    # The same command again replaces the converted models only when told; the finished fine-tune is kept.
    with pytest.raises(ValueError, match="out_dir=.* already holds a model"):
        extend_context.main(argv)
    assert extend_context.main([*argv, "--overwrite"])["perplexity"] == report["perplexity"]
