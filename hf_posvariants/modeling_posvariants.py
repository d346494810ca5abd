"""The shared core of the posvariants family: one block, one base model, the task heads, and the
thin family classes over them.

Position information is computed once per forward by `config.position_encoding` (and by the relative
encoding an attention variant may consume) and passed down to every layer in one `Positions` value:
added to the embeddings, rotated into queries/keys, or added to the attention scores.
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.distributed.pipeline_parallel import PipelineIdentityLayer
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention import ATTENTION_VARIANTS, PosVarAttention, fold_bias_into_mask
from .bias_route import BiasRoute, choose_bias_route
from .configuration_posvariants import PosVarConfig, PosVarLlamaConfig, PosVarTransformerConfig
from .lm_loss import LM_LOSSES
from .position_encodings import (
    POSITION_ENCODINGS,
    ContextualPositions,
    PositionEncoding,
    Positions,
    ScoreBias,
    position_ids_encodings,
)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like transformers' Llama."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


def build_norm(config: PosVarConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class FeedForward(nn.Module):
    """Position-wise feed-forward: act(x·W_up)·W_down, or with `mlp_type="gated"` the GLU form
    (act(x·W_gate) ⊙ x·W_up)·W_down (Shazeer, "GLU Variants Improve Transformer", 2020)."""

    def __init__(self, config: PosVarConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias) if config.mlp_type == "gated" else None
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PosVarBlock(GradientCheckpointingLayer):
    """Attention then feed-forward, each in a residual with its norm before (pre) or after (post) the sum.

    The norms keep Llama's names: `input_layernorm` belongs to the attention sublayer,
    `post_attention_layernorm` to the feed-forward one, whichever side of the residual they sit on.
    """

    def __init__(self, config: PosVarConfig, layer_idx: int, is_causal: bool):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = ATTENTION_VARIANTS[config.attention_variant](config, layer_idx, is_causal)
        self.mlp = FeedForward(config)
        self.input_layernorm = build_norm(config)
        self.post_attention_layernorm = build_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def residual(self, hidden_states: torch.Tensor, sublayer, norm: nn.Module) -> torch.Tensor:
        if self.pre_norm:
            return hidden_states + self.dropout(sublayer(norm(hidden_states)))
        return norm(hidden_states + self.dropout(sublayer(hidden_states)))

    def run(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: Positions,
        cache: Cache | None = None,
        key_value_states: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """Call the block with `positions` flattened into positional arguments: reentrant checkpointing sees only
        tensors passed positionally, and a bias table that needs a gradient but arrived inside `Positions` would be
        backpropagated once per layer through the graph that built it. `key_value_states`: attend from
        `hidden_states` to these states instead of to themselves (DeBERTa's Enhanced Mask Decoder)."""
        leaves, layout = tree_flatten(positions)
        return self(hidden_states, attention_mask, key_value_states, *leaves, positions_layout=layout, cache=cache, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_value_states: torch.Tensor | None,
        *position_leaves,
        positions_layout: TreeSpec,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """The block on `Positions` flattened by `run` into `position_leaves` and `positions_layout`."""
        positions = tree_unflatten(list(position_leaves), positions_layout)
        if key_value_states is not None:  # they pass the attention sublayer's norm as its input does
            kwargs["key_value_states"] = self.input_layernorm(key_value_states) if self.pre_norm else key_value_states

        def attend(x: torch.Tensor) -> torch.Tensor:
            return self.self_attn(x, attention_mask, positions, cache, **kwargs)[0]

        hidden_states = self.residual(hidden_states, attend, self.input_layernorm)
        return self.residual(hidden_states, self.mlp, self.post_attention_layernorm)


class PosVarPreTrainedModel(PreTrainedModel):
    config: PosVarConfig
    config_class = PosVarConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PosVarBlock"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True  # refused per position encoding by `check_attention_backend`
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # no graph break in training or static-cache decoding (tests/test_compile.py)
    _can_record_outputs = {"hidden_states": PosVarBlock, "attentions": PosVarAttention}

    def check_context_parallel(self, cp_size: int) -> None:
        """Refuse, naming the field, a model that cannot run with its sequence split over `cp_size` ranks (torch's
        context parallel, accelerate's `cp_size`); see `PosVarConfig.check_context_parallel`."""
        self.config.check_context_parallel(cp_size, is_causal=self.base_model.is_causal)

    @property
    def supports_context_parallel(self) -> bool:
        """transformers' answer (no sliding window), and ours: `check_context_parallel` passes. accelerate reads it
        when it prepares a model for `cp_size` > 1 and refuses a model that says no."""
        try:
            self.check_context_parallel(2)  # any size above 1: the answer does not depend on it
        except ValueError:
            return False
        return super().supports_context_parallel

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PosVarAttention):
            module.init_variant_weights()
        if isinstance(module, (PositionEncoding, ContextualPositions)):
            for name, value in module.initial_buffers().items():
                init.copy_(getattr(module, name), value)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        ignore_architecture_mismatch: bool = False,
        output_loading_info: bool = False,
        **kwargs,
    ):
        """transformers' loader, but a checkpoint that fits this architecture except in weights a deciding config
        field decides (`config.weight_fields`) is an error: config.json no longer describes it (say a hand-edited
        `position_encoding`). Any other mismatch loads with the keys reported, as in transformers: task-head
        weights missing or unused (a base checkpoint loaded into a classifier), or base-model weights that do
        not fit at all. `ignore_architecture_mismatch=True` loads anyway, initialising what is missing."""
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if not ignore_architecture_mismatch:
            check_weights_fit_config(model, loading_info, pretrained_model_name_or_path)
        warn_if_trained_as_masked_lm(model, pretrained_model_name_or_path)
        return (model, loading_info) if output_loading_info else model

    def init_parallel_plans(self) -> None:
        """transformers' plans from the config and the heads, less the gate projection's rule where the MLP has none
        (transformers would warn that it matches nothing), plus a rule for every attention module that holds
        parameters outside the split projections (`SHARED_BY_HEADS`)."""
        super().init_parallel_plans()
        if self.config.mlp_type != "gated":
            self._tp_plan = {rule: style for rule, style in self._tp_plan.items() if not rule.endswith("mlp.gate_proj")}
        if self.base_model is self:
            self._tp_plan.update(dict.fromkeys(self.shared_attention_modules(), SHARED_BY_HEADS))

    def shared_attention_modules(self) -> list[str]:
        """Plan rules (`layers.*.…`) of the attention modules whose own parameters every head reads: differential
        attention's λ and norm, CoPE's position embeddings. The heads split through the projections alone, so these
        stay whole on every rank."""
        rules = []
        for name, module in self.named_modules():
            rule = re.sub(r"\.\d+(\.|$)", r".*\1", name)
            owns_parameters = next(module.parameters(recurse=False), None) is not None
            if ".self_attn" in rule and owns_parameters and rule not in self._tp_plan and rule not in rules:
                rules.append(rule)
        return rules

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        """transformers' sharding at load time (`tp_plan="auto"`, `DistributedConfig`), after refusing a tensor-parallel
        split that the configuration's per-head state could not follow (before any weight is loaded); the base model
        then reads a shared position bias at the heads of this rank's slice of the projections."""
        tensor_parallel = distributed_config is not None and distributed_config.tp_size > 1
        if tensor_parallel:
            model.config.check_tensor_parallel(distributed_config.tp_size)
            register_shared_by_heads_style()
        model = super().maybe_distribute_model(model, distributed_config, mesh_manager)
        if tensor_parallel and mesh_manager is not None:
            mesh = mesh_manager.get_mesh("tp")
            heads = model.config.num_attention_heads // mesh.size()
            start = mesh.get_local_rank() * heads  # colwise q_proj: rank r holds output rows r·H/N·D onwards
            model.base_model.head_shard = HeadShard(slice(start, start + heads), mesh.get_group())
        return model


class SumGradientOverRanks(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over a process group (Megatron-LM's "f"). A table every
    tensor-parallel rank computes in full but reads at its own heads only gets each rank's heads' gradient there:
    summed, every rank's replicated parameters get the whole gradient, as in one process."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


# The tensor-parallel style of a module whose parameters every head reads (`shared_attention_modules`).
SHARED_BY_HEADS = "posvar_shared_by_heads"


@contextlib.contextmanager
def gradients_summed_over(module: nn.Module, group):
    """During a forward: `module`'s own parameters read through `SumGradientOverRanks`, so each backward adds the
    gradient of all ranks' heads to them. transformers' `replicated_with_grad_allreduce` sums `.grad` once it is
    accumulated instead, which would add the earlier micro-batches again under gradient accumulation."""
    originals = dict(module._parameters)
    if torch.is_grad_enabled():
        for name, parameter in originals.items():
            if parameter is not None and parameter.requires_grad:
                module._parameters[name] = SumGradientOverRanks.apply(parameter, group)
    try:
        yield
    finally:
        module._parameters.update(originals)


def register_shared_by_heads_style() -> None:
    """Register `SHARED_BY_HEADS` in transformers' parallel styles (when a model is first distributed: the styles
    exist only where torch.distributed does)."""
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
    from transformers.distributed.tensor_parallel import TensorParallelLayer

    class SharedByHeadsParallel(TensorParallelLayer):
        """Parameters kept whole on every rank, their gradient summed over the ranks on every backward."""

        def context_around_forward(self, module, mesh):
            return gradients_summed_over(module, mesh.get_group())

    if SHARED_BY_HEADS not in ALL_PARALLEL_STYLES:
        ALL_PARALLEL_STYLES.register(SHARED_BY_HEADS, SharedByHeadsParallel())


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one tensor-parallel rank holds, `heads` of the model's (in config order), and the process
    `group` of the ranks holding the others (None: a single process, as in tests)."""

    heads: slice
    group: object | None = None

    def select(self, bias: ScoreBias) -> ScoreBias:
        """The shared bias at these heads; its tables that need a gradient sum it over the group (parameters stay
        replicated, so checkpoints and optimizers see them whole)."""
        if self.group is not None:
            tables = [SumGradientOverRanks.apply(t, self.group) if t.requires_grad else t for t in bias.tables]
            bias = ScoreBias(bias.encoding, type(bias.tables)(*tables), bias.query_length, bias.key_length)
        return bias.for_heads(self.heads)


def warn_if_trained_as_masked_lm(model: PosVarPreTrainedModel, source) -> None:
    """A masked LM's weights load into the causal-LM head without error (same names), but they never learned to
    predict the next token: warn, since a harness would otherwise report meaningless scores."""
    trained_as = (model.config.architectures or [""])[0]
    if isinstance(model, GenerationMixin) and trained_as.endswith("ForMaskedLM"):
        warnings.warn(
            f"{str(source)!r} was trained as a masked language model ({trained_as}, bidirectional); loaded as "
            f"{type(model).__name__} it predicts the next token with weights that never learned to, so its "
            "perplexity and generations are meaningless. Load it with AutoModelForMaskedLM, or fine-tune it as a "
            "causal LM first.",
            UserWarning,
            stacklevel=3,
        )


def check_weights_fit_config(model: PosVarPreTrainedModel, loading_info: dict, source) -> None:
    """Refuse a load whose base-model weights are missing or unused only where a deciding field decides them
    (the weights on file fit another value of that field), naming the fields.

    Missing keys carry the model's names, unused ones the checkpoint's, with or without the base-model prefix;
    a key is the base model's when it has that prefix or starts with one of the base model's attributes."""

    def in_base_model(key: str) -> bool:
        return key.startswith(f"{model.base_model_prefix}.") or hasattr(model.base_model, key.split(".")[0])

    def deciding_fields(key: str) -> list[str]:
        return [field for fragment, field in model.config.weight_fields.items() if fragment in key]

    missing = sorted(key for key in loading_info["missing_keys"] if in_base_model(key))
    unused = sorted(key for key in loading_info["unexpected_keys"] if in_base_model(key))
    if not missing and not unused or not all(deciding_fields(key) for key in missing + unused):
        return
    fields = [f"{field}={getattr(model.config, field)!r}" for field in dict.fromkeys(
        field for key in missing + unused for field in deciding_fields(key)
    )]
    raise ValueError(
        f"The weights in {str(source)!r} do not fit its config.json: base-model weights missing {missing[:6]}, "
        f"unused {unused[:6]}. They are decided by {', '.join(fields)} in config.json: "
        "was it edited after saving? Set it back to the value the checkpoint was trained with, or pass "
        "ignore_architecture_mismatch=True to from_pretrained to load anyway (missing weights are then initialised)."
    )


def build_position_encoding(config: PosVarConfig, is_causal: bool, name: str | None = None) -> PositionEncoding:
    """The configured encoding (or the one named), from this module's registry rather than the config's: remote
    code loads the config and the model files as separate module copies, and `_init_weights` recognises only
    this copy's `PositionEncoding` (a foreign one would keep uninitialised buffers)."""
    return POSITION_ENCODINGS[name or config.position_encoding](config, is_causal)


def check_not_empty(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    """Refuse a batch without tokens here, before the masking utilities and kernels fail on it obscurely."""
    name, tensor = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
    if tensor.ndim < 2 or 0 in tensor.shape[:2]:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}; allowed shapes are (batch_size, sequence_length"
            f"{', hidden_size' if name == 'inputs_embeds' else ''}) with batch_size >= 1 and sequence_length >= 1."
        )


def context_parallel_active() -> bool:
    """Whether torch's context parallel is on in this process: its ring handlers of SDPA's kernels installed in
    DTensor's dispatcher, as both `context_parallel()` (accelerate's `cp_size`) and the module-wrapper API do while
    the sequence is split. Reads torch's private module, pinned to torch 2.13; never imported, it cannot be on.
    Not read while dynamo traces: it cannot call the check, and would not guard a graph on its answer."""
    ring = sys.modules.get("torch.distributed.tensor.experimental._context_parallel._attention")
    if ring is None or torch.compiler.is_compiling():
        return False
    try:
        return not ring.custom_ops.keys().isdisjoint(ring.DTensor._op_dispatcher._custom_op_handlers)
    except AttributeError:  # another torch's private layout: no check, rather than every forward failing
        return False


def positions_from_mask(
    attention_mask: torch.Tensor | None, query_slots: torch.LongTensor, batch_size: int
) -> torch.LongTensor:
    """Position of each query token, counting only real tokens, so left padding does not shift them. Refused under
    context parallelism: a rank would count its piece of the sequence from 0."""
    if context_parallel_active():
        raise ValueError(
            "position_ids is required under context parallelism (torch's context_parallel is active): each rank holds "
            "a piece of the sequence, so positions counted from its own input_ids or attention_mask would start at 0 "
            "on every rank and be silently wrong. Pass position_ids (torch.arange(sequence_length) for each row) among "
            "the buffers context_parallel shards, as transformers' Trainer does."
        )
    if attention_mask is None or attention_mask.ndim != 2:
        return query_slots.unsqueeze(0).expand(batch_size, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    return positions[:, query_slots]


def kernel_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """The dtype the attention kernels will compute in: autocast's where it is on for the device, else the states'."""
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden_states.dtype


class PosVarModel(PosVarPreTrainedModel):
    """The bare stack: embeddings, position encoding, blocks, final norm (pre-norm only).

    Causal or bidirectional according to `config.is_decoder`, unless a head decides (`is_causal`). Under tensor
    parallelism `head_shard` names the heads this rank's projections hold.
    """

    head_shard: HeadShard | None = None

    def __init__(self, config: PosVarConfig, is_causal: bool | None = None):
        super().__init__(config)
        self.is_causal = config.is_decoder if is_causal is None else is_causal
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embedding_scale = config.hidden_size**0.5 if config.scale_embeddings else 1.0
        self.position_encoding = build_position_encoding(config, self.is_causal)
        # A per-layer schedule's encodings beyond the main one, each built once and shared by its layers.
        self.layer_encoding_names = [config.layer_position_encoding(i) for i in range(config.num_hidden_layers)]
        self.scheduled_encodings = nn.ModuleDict(
            {
                name: build_position_encoding(config, self.is_causal, name)
                for name in dict.fromkeys(self.layer_encoding_names)
                if name != config.position_encoding
            }
        )
        self.embed_norm = self.embedding_norm(config)
        relative = ATTENTION_VARIANTS[config.attention_variant].relative_encoding_name(config)
        self.relative_positions = build_position_encoding(config, self.is_causal, relative) if relative else None
        self.layers = nn.ModuleList(
            [PosVarBlock(config, layer_idx, self.is_causal) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = build_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def build_mask(self, inputs_embeds, attention_mask, cache, position_ids):
        if self.is_causal:
            return create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=self.cache_layer(),
            )
        return create_bidirectional_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache
        )

    @staticmethod
    def embedding_norm(config: PosVarConfig) -> nn.Module:
        """A norm on the summed embeddings; none in the core (DeBERTa has one)."""
        return nn.Identity()

    def cache_layer(self) -> int:
        """The layer whose KV cache tells this forward how many tokens came before: the first layer it runs. Every
        layer's cache grows by the same tokens, but a stage of transformers' pipeline parallelism writes only its own
        layers' caches, so a later stage's cache holds nothing at layer 0."""
        owned = (index for index, layer in enumerate(self.layers) if not isinstance(layer, PipelineIdentityLayer))
        return next(owned, 0)

    def embed(self, inputs_embeds: torch.Tensor, position_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings (scaled) plus the absolute encoding, if any, normed where the family norms them."""
        if isinstance(self.layers[0], PipelineIdentityLayer):
            # A later stage of transformers' pipeline parallelism: `inputs_embeds` are the previous stage's hidden
            # states, embedded there already.
            return inputs_embeds
        hidden_states = self.position_encoding.add_to_embeddings(inputs_embeds * self.embedding_scale, position_ids)
        return self.dropout(self.embed_norm(hidden_states))

    def check_paged_encodings(self) -> None:
        """Continuous batching packs every request into one row and gathers each one's keys from a paged cache in
        the layer, so an encoding can only be read from `position_ids` (added to the embeddings or rotated into
        q/k): a bias or relative positions need key positions that the paged batch does not carry."""
        for field, value, encoding in self.config.position_components():
            if not encoding.reads_position_ids_only():
                why = ("its codes change as the sequence grows, so it keeps no KV cache" if not encoding.cacheable
                       else "it needs each key's position, which a paged batch does not carry")  # fmt: skip
                raise ValueError(
                    f"Continuous batching (a paged KV cache) cannot run {field}={value!r} ({encoding.kind}): {why}. "
                    f"Use generate(); continuous batching takes the position encodings {position_ids_encodings()}."
                )

    def encoding_named(self, name: str) -> PositionEncoding:
        return self.position_encoding if name == self.config.position_encoding else self.scheduled_encodings[name]

    def bias_route(
        self, bias: ScoreBias | None, layer_idx: int, hidden_states: torch.Tensor, key_length: int, mask
    ) -> BiasRoute:
        """`choose_bias_route` for this forward, with transformers' `mask` for it, and the layers sharing the encoding
        of layer `layer_idx`."""
        name, device_type = self.layer_encoding_names[layer_idx], hidden_states.device.type
        batch_size, query_length = hidden_states.shape[:2]
        score_elements = batch_size * self.config.num_attention_heads * query_length * key_length
        layers = [
            layer.self_attn for layer, used in zip(self.layers, self.layer_encoding_names)
            if used == name and not isinstance(layer, PipelineIdentityLayer)  # a layer of another pipeline stage
        ]  # fmt: skip
        return choose_bias_route(
            self.config._attn_implementation,
            device_type,
            bias,
            grad_enabled=torch.is_grad_enabled(),
            attention_dropout=self.training and self.config.attention_dropout > 0,
            compiling=torch.compiler.is_compiling(),
            layers_take_gradient_kernel=all(layer.takes_gradient_kernel(score_elements, device_type) for layer in layers),
            layers_take_columns=all(layer.takes_bias_columns() for layer in layers),
            single_precision=kernel_dtype(hidden_states).itemsize >= 4,
            # No mask: transformers left causality to the kernel, which SDPA applies aligned top-left.
            causal_only=self.is_causal and mask is None and query_length == key_length,
            training=self.training,
            layers_own_kernel=all(layer.has_own_kernel() for layer in layers),
        )

    def compute_positions(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.LongTensor,
        query_slots: torch.LongTensor,
        key_slots: torch.LongTensor,
        mask: torch.Tensor | None,
        layer_idx: int = -1,
    ) -> tuple[Positions, torch.Tensor | None]:
        """The `Positions` of layer `layer_idx` (by default the last), from the encoding that layer uses, with the bias
        route of this forward; and the mask, with the shared bias folded in where the route says (eager, SDPA): in the
        compute dtype, (1, H, Q, K) unless the mask or the bias is per batch row. Layers of one encoding share them
        (`positions_per_layer`)."""
        encoding = self.encoding_named(self.layer_encoding_names[layer_idx])
        bias = encoding.score_bias(query_slots, key_slots, position_ids)
        if bias is not None and self.head_shard is not None:
            bias = self.head_shard.select(bias)
        route = self.bias_route(bias, layer_idx, hidden_states, key_slots.shape[0], mask)
        if route.folded:
            # Sent to the row by the kernel, the gradient need not flow through the folded mask.
            with torch.no_grad() if route.gradient == "row" else contextlib.nullcontext():
                materialised = bias.materialise().to(hidden_states.dtype)
                mask = fold_bias_into_mask(materialised, mask, query_slots, key_slots, self.is_causal)
            bias = bias if route.gradient == "row" else None
        relative = None
        if self.relative_positions is not None:
            relative = self.relative_positions.relative_positions(query_slots, key_slots)
        positions = Positions(
            rotary=encoding.rotary_embeddings(hidden_states, position_ids),
            key_rotary=encoding.key_rotary_embeddings(hidden_states, position_ids),
            bias=bias,
            relative=relative,
            route=route,
        )
        return positions, mask

    def positions_per_layer(self, *inputs) -> list[tuple[Positions, torch.Tensor | None]]:
        """Every layer's `Positions` and mask, `compute_positions(*inputs, layer_idx)` once per distinct encoding."""
        first_layer = {}
        for layer_idx, name in enumerate(self.layer_encoding_names):
            first_layer.setdefault(name, layer_idx)
        computed = {name: self.compute_positions(*inputs, layer_idx) for name, layer_idx in first_layer.items()}
        return [computed[name] for name in self.layer_encoding_names]

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        check_not_empty(input_ids, inputs_embeds)
        self.config.check_attention_backend()
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, query_length = inputs_embeds.shape[:2]
        use_cache = use_cache and self.is_causal
        if use_cache and not self.position_encoding.cacheable:
            raise ValueError(
                f"position_encoding={self.config.position_encoding!r} changes earlier tokens' encodings as the "
                "sequence grows, so a KV cache would be stale; call with use_cache=False."
            )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        paged = isinstance(cache, PagedAttentionCache)
        if paged:
            self.check_paged_encodings()
        # A paged cache gathers each request's keys inside the layer; no encoding allowed with it reads key slots.
        sized_cache = cache is not None and not paged
        cache_layer = self.cache_layer()
        past_length = cache.get_seq_length(cache_layer) if sized_cache else 0
        device = inputs_embeds.device
        # A static cache counts its tokens in a tensor: added to, it stays a traced value under torch.compile.
        query_slots = torch.arange(query_length, device=device) + past_length
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, query_slots, batch_size)
        mask = self.build_mask(inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = self.embed(inputs_embeds, position_ids)
        # The keys the kernels will see: past + new for a dynamic cache, the whole buffer for a static one.
        key_length, key_offset = cache.get_mask_sizes(query_length, cache_layer) if sized_cache else (query_length, 0)
        key_slots = torch.arange(key_offset, key_offset + key_length, device=device)
        per_layer = self.positions_per_layer(hidden_states, position_ids, query_slots, key_slots, mask)
        for layer, (positions, layer_mask) in zip(self.layers, per_layer):
            if isinstance(layer, PipelineIdentityLayer):  # a layer of another pipeline stage
                continue
            hidden_states = layer.run(hidden_states, layer_mask, positions, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class PosVarForCausalLM(PosVarPreTrainedModel, GenerationMixin):
    """Causal language model: always causal, with a KV cache and `generate()`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    lm_loss = "plain"  # the training loss: "plain" (from the logits) or a name in LM_LOSSES (`use_lm_loss`)

    def __init__(self, config: PosVarConfig):
        super().__init__(config)
        self.model = PosVarModel(config, is_causal=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if not self.model.position_encoding.cacheable:
            self.generation_config.use_cache = False
        self.post_init()

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, position_ids=None, **kwargs):
        """The mask generate() builds ahead of each forward for a compilable (static) cache: the forward's own, sized
        at its `cache_layer` (transformers' default reads layer 0, which a later pipeline stage never writes)."""
        return self.model.build_mask(inputs_embeds, attention_mask, cache, position_ids)

    def init_continuous_batching(self, *args, **kwargs):
        """transformers' continuous batching (`generate_batch`, `transformers serve --continuous_batching`), refused
        before any request is queued when the encoding cannot run on a paged cache (the manager would otherwise
        only log each request's failure)."""
        self.model.check_paged_encodings()
        return super().init_continuous_batching(*args, **kwargs)

    def use_lm_loss(self, name: str) -> None:
        """Train with loss `name`: "plain", or one of `LM_LOSSES` computed from the hidden states without the
        (tokens × vocab) logits, which training steps then do not return (evaluation still does)."""
        if name != "plain" and name not in LM_LOSSES:
            raise ValueError(f"lm_loss={name!r} is not available; allowed values are {['plain', *LM_LOSSES]}.")
        self.lm_loss = name

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        if labels is not None and self.training and self.lm_loss != "plain":
            logits, loss = None, LM_LOSSES[self.lm_loss](hidden_states, self.lm_head.weight, labels, **kwargs)
        else:
            logits, loss = self.lm_head(hidden_states), None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class PosVarEncoderHead(PosVarPreTrainedModel):
    """The one forward of the heads that run the stack without a cache (masked LM, sequence and token
    classification): the base model, then the head's `logits` and `head_loss`, returned as `output_class`."""

    output_class: type

    def logits(self, outputs, attention_mask: torch.Tensor | None, position_ids: torch.LongTensor | None) -> torch.Tensor:
        raise NotImplementedError

    def head_loss(self, logits: torch.Tensor, labels: torch.LongTensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def run_base_model(self, **inputs):
        """The base model's outputs; a head needing more of them (DeBERTa's decoder) asks here."""
        return self.model(use_cache=False, **inputs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        outputs = self.run_base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs
        )
        logits = self.logits(outputs, attention_mask, position_ids)
        loss = None if labels is None else self.head_loss(logits, labels, **kwargs)
        return self.output_class(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class PosVarForMaskedLM(PosVarEncoderHead):
    """Masked language model (Devlin et al., "BERT", 2019): always bidirectional."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    output_class = MaskedLMOutput

    def __init__(self, config: PosVarConfig):
        super().__init__(config)
        self.model = PosVarModel(config, is_causal=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def logits(self, outputs, attention_mask, position_ids):
        return self.lm_head(outputs.last_hidden_state)

    def head_loss(self, logits, labels, **kwargs):
        return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)


def pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, T, D) → (B, D): the first token, the last real token (either padding side), or the mean of real tokens."""
    if pooling == "first":
        return hidden_states[:, 0]
    if attention_mask is None:
        return hidden_states[:, -1] if pooling == "last" else hidden_states.mean(dim=1)
    mask = attention_mask.to(hidden_states.device)
    if pooling == "last":
        slots = torch.arange(mask.shape[-1], device=mask.device)
        last = (slots * mask.long()).argmax(-1)
        return hidden_states[torch.arange(hidden_states.shape[0], device=mask.device), last]
    weights = mask.to(hidden_states.dtype)[..., None]
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class PosVarClassifierHead(PosVarEncoderHead):
    """A linear classifier (with dropout before it) over the base model's states, for the classification heads."""

    base_model_class = PosVarModel  # a family with its own base model (DeBERTa) overrides this

    def __init__(self, config: PosVarConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class PosVarForSequenceClassification(PosVarClassifierHead):
    """Sequence classification or regression over a pooled token (`config.classifier_pooling`)."""

    output_class = SequenceClassifierOutputWithPast

    @property
    def pooling(self) -> str:
        return self.config.classifier_pooling or ("last" if self.model.is_causal else "first")

    def logits(self, outputs, attention_mask, position_ids):
        return self.score(self.dropout(pool(outputs.last_hidden_state, attention_mask, self.pooling)))

    def head_loss(self, logits, labels, **kwargs):
        return self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)


class PosVarForTokenClassification(PosVarClassifierHead):
    """Per-token classification (tagging) on the last hidden states."""

    output_class = TokenClassifierOutput

    def logits(self, outputs, attention_mask, position_ids):
        return self.score(self.dropout(outputs.last_hidden_state))

    def head_loss(self, logits, labels, **kwargs):
        return self.loss_function(logits, labels, self.config, **kwargs)


# The families: the shared heads bound to each family's config, nothing else. A generating head lists
# GenerationMixin itself, as transformers' own heads do.
class PosVarTransformerModel(PosVarModel):
    config_class = PosVarTransformerConfig


class PosVarTransformerForCausalLM(PosVarForCausalLM, GenerationMixin):
    config_class = PosVarTransformerConfig


class PosVarTransformerForMaskedLM(PosVarForMaskedLM):
    config_class = PosVarTransformerConfig


class PosVarTransformerForSequenceClassification(PosVarForSequenceClassification):
    config_class = PosVarTransformerConfig


class PosVarTransformerForTokenClassification(PosVarForTokenClassification):
    config_class = PosVarTransformerConfig


class PosVarLlamaModel(PosVarModel):
    config_class = PosVarLlamaConfig


class PosVarLlamaForCausalLM(PosVarForCausalLM, GenerationMixin):
    config_class = PosVarLlamaConfig


class PosVarLlamaForMaskedLM(PosVarForMaskedLM):
    config_class = PosVarLlamaConfig


class PosVarLlamaForSequenceClassification(PosVarForSequenceClassification):
    config_class = PosVarLlamaConfig


class PosVarLlamaForTokenClassification(PosVarForTokenClassification):
    config_class = PosVarLlamaConfig
