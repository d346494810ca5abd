"""Conversion between transformers' `LlamaForCausalLM` and the posvariants causal LMs, both ways.

posvar_llama keeps Llama's parameter names, so a state dict loads as it is and only the config is translated, field
by field (`LLAMA_FIELDS`, shared with DiffLlama's converter, whose block is Llama's).

Into Llama: a posvar model computes Llama's function when its block is Llama's (`LLAMA_BLOCK`: RoPE with any of
transformers' scalings, standard attention, RMSNorm before each sublayer, gated MLP, unscaled embeddings, no
per-layer schedule) and every other field either maps onto a Llama field or is read only by components such a model
does not build (`UNUSED_BY_LLAMA`). The folder `export_llama` writes loads with plain transformers, without this
package and without remote code, and so in every engine that serves Llama (vLLM, TGI, SGLang, llama.cpp). Anything
else is refused naming the field, its value and what a Llama has.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
)

from ..configuration_posvariants import PosVarConfig, PosVarLlamaConfig
from ..modeling_posvariants import PosVarForCausalLM
from ..training.run_folder import check_model_folder
from .output import model_folder_written

# Config field of a Llama-block model in transformers → ours, where the two differ only in name or not at all.
LLAMA_FIELDS: dict[str, str] = {
    **{
        name: name
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
            "attention_bias", "attention_dropout", "use_cache",
        )
    },
    "rms_norm_eps": "norm_eps",
}  # fmt: skip
# LlamaConfig's own: the fields above plus those DiffLlama lacks.
LLAMA_CONFIG_FIELDS: dict[str, str] = {**LLAMA_FIELDS, "mlp_bias": "mlp_bias"}

# The posvariants fields whose values make the block Llama's; each must hold exactly this value.
LLAMA_BLOCK: dict[str, object] = {
    "position_encoding": "rope",
    "layer_position_encodings": None,
    "attention_variant": "standard",
    "norm_type": "rmsnorm",
    "norm_position": "pre",
    "mlp_type": "gated",
    "scale_embeddings": False,
}

# Fields a causal LM with Llama's block never reads: other encodings' and variants' hyper-parameters, the
# classifier heads' settings, `is_decoder` (a causal-LM head is always causal) and `hidden_dropout`, which acts
# only in training (the exported model computes the same logits; a fine-tune of it trains without that dropout).
UNUSED_BY_LLAMA = frozenset({
    "relative_attention_num_buckets", "relative_attention_max_distance", "kerple_variant", "dynamic_bias_hidden_size",
    "dynamic_bias_layers", "fire_mlp_width", "fire_threshold", "xpos_scale_base", "cope_max_positions",
    "differential_head_layout", "differential_norm_affine", "differential_lambda_init", "differential_lambda_std",
    "is_decoder", "classifier_pooling", "classifier_dropout", "hidden_dropout",
})  # fmt: skip

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Run records and results that travel with the weights (the model card and evaluation harnesses read them).
RECORD_FILES = ("run_args.json", "all_results.json", "train_results.json", "eval_results.json")


def llama_differences(config: PosVarConfig) -> list[str]:
    """Every way `config` is not exactly a Llama, as "field=value (a Llama has ...)"; empty when it is one."""
    differences = [
        f"{field}={getattr(config, field)!r} (a Llama has {value!r})"
        for field, value in LLAMA_BLOCK.items()
        if getattr(config, field, None) != value
    ]
    rotary_fraction = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if rotary_fraction != 1.0:
        differences.append(
            f"rope_parameters['partial_rotary_factor']={rotary_fraction!r} (a Llama has 1.0: it rotates every channel)"
        )
    # Any other field (a family's own, or one added later) must keep the posvar_llama default, which is Llama's.
    llama_defaults = PosVarLlamaConfig()
    accounted = set(LLAMA_CONFIG_FIELDS.values()) | set(LLAMA_BLOCK) | UNUSED_BY_LLAMA
    base_fields = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    for field in dataclasses.fields(config):
        if field.name in accounted or field.name in base_fields:
            continue
        value, default = getattr(config, field.name), getattr(llama_defaults, field.name, dataclasses.MISSING)
        if value != default:
            allowed = "no Llama equivalent" if default is dataclasses.MISSING else f"a Llama has {default!r}"
            differences.append(f"{field.name}={value!r} ({allowed})")
    return differences


def check_exportable(config: PosVarConfig, architecture: str | None = None) -> None:
    """Refuse a config (and a saved head, `architecture`) that `LlamaForCausalLM` would not compute exactly."""
    if not isinstance(config, PosVarConfig):
        raise ValueError(
            f"model_type={config.model_type!r} is not a posvariants model; allowed are the posvariants families "
            "(posvar_llama, posvar_transformer with Llama's block)."
        )
    differences = llama_differences(config)
    if architecture is not None and not architecture.endswith("ForCausalLM"):
        differences.insert(0, f"architectures=[{architecture!r}] (only a causal LM exports as LlamaForCausalLM)")
    if differences:
        raise ValueError(
            f"This {config.model_type} model is not exactly a Llama, so it cannot be exported as LlamaForCausalLM: "
            f"{'; '.join(differences)}. Serve it with transformers (trust_remote_code=True, or with hf_posvariants "
            "installed); README.md's 'Training and sharing' says which configurations vLLM's Transformers backend "
            "takes."
        )


def llama_config_from_posvar(config: PosVarConfig) -> LlamaConfig:
    """The `LlamaConfig` computing what `config`'s causal LM computes (checked first)."""
    check_exportable(config)
    fields = {theirs: getattr(config, ours) for theirs, ours in LLAMA_CONFIG_FIELDS.items()}
    fields["rope_parameters"] = dict(config.rope_parameters)
    llama = LlamaConfig(**fields)
    llama.architectures = [LlamaForCausalLM.__name__]
    return llama


def convert_to_llama(model: PosVarForCausalLM) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` with the weights, dtype, device and generation settings of `model`."""
    if not isinstance(model, PosVarForCausalLM):
        raise ValueError(f"{type(model).__name__} is not a posvariants causal LM; only a ...ForCausalLM exports.")
    config = llama_config_from_posvar(model.config)
    llama = LlamaForCausalLM._from_config(
        config, dtype=model.dtype, attn_implementation=model.config._attn_implementation
    )
    llama.load_state_dict(model.state_dict(), strict=True)  # same names; anything missing or extra is an error
    llama.generation_config = model.generation_config
    return llama.to(model.device).train(model.training)


def export_llama(source: str | Path, destination: str | Path, overwrite: bool = False) -> Path:
    """Write the posvariants causal-LM folder `source` as a plain Llama folder: weights and config, the tokenizer
    when `source` has one, and the run record and results. The config is checked before any weight is read.
    `destination` is checked and written as `output.model_folder_written` says: new or empty unless `overwrite`
    (then an earlier export is replaced whole), written beside it and renamed into place."""
    source, destination = Path(source), Path(destination)
    check_model_folder(source, "source")
    config = AutoConfig.from_pretrained(source)
    check_exportable(config, (config.architectures or [None])[0])
    with model_folder_written(source, destination, overwrite) as partial:
        model = AutoModelForCausalLM.from_pretrained(source)
        convert_to_llama(model).save_pretrained(partial)
        copy_tokenizer(source, partial)
        for name in RECORD_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, partial / name)
    return destination


def copy_tokenizer(source: Path, destination: Path) -> None:
    """Save the source's tokenizer into `destination`. A folder without one (no tokenizer_config.json, which every
    saved tokenizer has) exports the weights alone, with a warning; a tokenizer that is there but does not load is
    an error, not an export without it."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        if (source / TOKENIZER_CONFIG_FILE).is_file():
            raise ValueError(f"the tokenizer in {str(source)!r} does not load ({type(error).__name__}: {error}); "
                             "repair or replace its tokenizer files and export again.") from error  # fmt: skip
        warnings.warn(f"{str(source)!r} holds no tokenizer, so the export has the weights alone: save the tokenizer "
                      "the model was trained with into it (tokenizer.save_pretrained) before serving it.", UserWarning,
                      stacklevel=3)  # fmt: skip
        return
    tokenizer.save_pretrained(destination)


def convert_llama_config(config: LlamaConfig) -> PosVarLlamaConfig:
    """The posvar_llama config computing what `LlamaForCausalLM(config)` computes."""
    fields = {ours: getattr(config, theirs) for theirs, ours in LLAMA_CONFIG_FIELDS.items()}
    fields["rope_parameters"] = dict(config.rope_parameters)
    return PosVarLlamaConfig(**fields)


def convert_llama_checkpoint(source: str | Path, destination: str | Path, tokenizer: str | Path | None = None,
                             overwrite: bool = False, field: str = "output") -> PosVarLlamaConfig:  # fmt: skip
    """Write `source` (a LlamaForCausalLM or posvar_llama folder) as a posvar_llama checkpoint with its tokenizer;
    `destination` (named `field` in errors) is checked and written as `output.model_folder_written` says."""
    config = AutoConfig.from_pretrained(source)
    if config.model_type not in ("llama", "posvar_llama"):
        raise ValueError(f"model_type={config.model_type!r} is not supported; allowed values are ['llama', "
                         "'posvar_llama'].")  # fmt: skip
    with model_folder_written(source, destination, overwrite, field) as partial:
        model = _posvar_llama_from(source, config)
        model.save_pretrained(partial)
        AutoTokenizer.from_pretrained(tokenizer or source).save_pretrained(partial)
    return model.config


def _posvar_llama_from(source: str | Path, config: PreTrainedConfig) -> PosVarForCausalLM:
    if config.model_type == "llama":
        llama = LlamaForCausalLM.from_pretrained(source)
        model = AutoModelForCausalLM.from_config(convert_llama_config(config))
        model.load_state_dict(llama.state_dict(), strict=True)  # identical names; a missing key is an error
    else:
        model = AutoModelForCausalLM.from_pretrained(source)
    return model
