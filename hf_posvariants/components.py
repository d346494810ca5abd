"""The registries of the family's components, complete: importing this module registers every built-in position
encoding and attention variant, so the configs validate against all of them (a plugin registers more from outside
with `register_position_encoding` or `register_attention_variant`).
This file imports only torch and transformers: it travels with remote-code checkpoints.
"""

from __future__ import annotations

from .attention import ATTENTION_VARIANTS, register_attention_variant
from .differential_attention import DifferentialAttention  # noqa: F401  (registers "differential")
from .disentangled_attention import DisentangledAttention  # noqa: F401  (registers "disentangled")
from .position_encodings import (
    POSITION_ENCODINGS,
    position_ids_encodings,
    register_position_encoding,
    selectable_position_encodings,
)

__all__ = [
    "ATTENTION_VARIANTS",
    "POSITION_ENCODINGS",
    "position_ids_encodings",
    "register_attention_variant",
    "register_position_encoding",
    "selectable_position_encodings",
]
