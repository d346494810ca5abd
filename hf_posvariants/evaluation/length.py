"""Length extrapolation: perplexity of a causal LM at multiples of its training length.

Two ways to cut a held-out text into windows of length L (Press et al., "Train Short, Test Long",
2022, show they differ):

- non-overlapping: consecutive blocks of L tokens; token t of a block sees t-1 tokens of context,
  so the average covers every context size from 0 to L-1;
- sliding window: windows of L tokens advancing by a stride S; only the last S tokens of each window
  are scored (all of the first), so every scored token sees at least L-S tokens of context.

Every length scores the same span of text, so the numbers are comparable across lengths. A model
whose position table is shorter than L (learned, index, binary) is reported as unavailable there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from hf_posvariants.bias_route import FUSED_MASK_BACKENDS, SCORE_FUNCTION_BACKENDS
from hf_posvariants.evaluation.data import blocks
from hf_posvariants.evaluation.report import markdown_table
from hf_posvariants.training.run_folder import read_run_record

MODES = ("nonoverlapping", "sliding")
# transformers' RoPE scalings that stretch a trained context, for evaluation and for context extension alike.
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")


@dataclass
class LengthResult:
    length: int
    mode: str
    loss: float | None
    perplexity: float | None
    tokens_scored: int
    status: str = "ok"

    def as_dict(self) -> dict:
        return asdict(self)


def supported_length(config) -> int | None:
    """The longest sequence the model's position scheme can encode, or None when unbounded."""
    encoding_class = getattr(config, "position_encoding_class", None)
    if encoding_class is not None and encoding_class.bounded:
        return config.max_position_embeddings
    return None


def scaled_rope_parameters(rope_parameters: dict, rope_type: str, factor: float, original_length: int) -> dict:
    """transformers' rope_parameters for `rope_type` stretching a model trained at `original_length` by `factor`."""
    if rope_type not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling={rope_type!r} is not supported; allowed values are {list(ROPE_SCALINGS)}.")
    if factor <= 1:
        raise ValueError(f"factor={factor} must exceed 1 (the extended context is factor × the original length).")
    kept = {key: rope_parameters[key] for key in ("rope_theta", "partial_rotary_factor") if key in rope_parameters}
    parameters = {**kept, "rope_type": rope_type, "factor": float(factor)}
    if rope_type in ("yarn", "llama3"):
        parameters["original_max_position_embeddings"] = original_length
    if rope_type == "llama3":  # Llama 3.1's published band edges
        parameters.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return parameters


def rope_scaled_config(config, rope_type: str, factor: float, train_length: int):
    """A copy of `config` whose RoPE is rescaled for evaluation with transformers' own scaling
    functions (`scaled_rope_parameters`); the weights are untouched."""
    encoding = getattr(config, "position_encoding", "rope")
    if encoding != "rope" or getattr(config, "rope_parameters", None) is None:
        raise ValueError(
            f"rope_scaling={rope_type!r} needs a rotary model, but position_encoding={encoding!r}; "
            "allowed encodings are ['rope']."
        )
    config = config.__class__.from_dict(config.to_dict())
    config.rope_parameters = scaled_rope_parameters(config.rope_parameters, rope_type, factor, train_length)
    if rope_type == "dynamic":
        # Dynamic NTK rescales once a sequence exceeds max_position_embeddings: make that the trained length.
        config.max_position_embeddings = train_length
    return config


def long_context_backend(config, requested: str = "auto") -> str:
    """The attention backend for long inputs: with "auto", flex attention where the model adds a score bias
    (declared by its encoding or attention variant) that flex can carry, since flex computes it per block
    from small tables instead of materialising a (heads × length × length) tensor; SDPA otherwise (CoPE's
    content-dependent counts, for one, have no flex form)."""
    if requested != "auto":
        return requested
    requirements = config.backend_requirements() if hasattr(config, "backend_requirements") else []
    flex = SCORE_FUNCTION_BACKENDS[0]
    if requirements and all(flex in backends for _, _, backends in requirements):
        return flex
    return FUSED_MASK_BACKENDS[0]


def load_causal_lm(checkpoint: str, rope_scaling: str | None = None, rope_factor: float | None = None,
                   train_length: int | None = None, attn_implementation: str = "auto") -> PreTrainedModel:
    config = AutoConfig.from_pretrained(checkpoint)
    if rope_scaling:
        config = rope_scaled_config(config, rope_scaling, rope_factor, train_length or config.max_position_embeddings)
    backend = long_context_backend(config, attn_implementation)
    return AutoModelForCausalLM.from_pretrained(checkpoint, config=config, attn_implementation=backend).eval()


# Positions whose logits are computed at once: at 64k tokens the full (length × vocab) fp32 logits would not fit.
LOGIT_CHUNK = 4096


@torch.no_grad()
def token_losses(model: PreTrainedModel, input_ids: torch.LongTensor) -> torch.Tensor:
    """(B, L) ids → (B, L-1) next-token losses in nats, projecting the hidden states to logits in chunks."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    head, targets = model.get_output_embeddings(), input_ids[:, 1:]
    losses = [
        F.cross_entropy(head(hidden[:, start : start + LOGIT_CHUNK]).float().transpose(1, 2),
                        targets[:, start : start + LOGIT_CHUNK], reduction="none")
        for start in range(0, hidden.shape[1], LOGIT_CHUNK)
    ]
    return torch.cat(losses, dim=1)


def nonoverlapping(model, tokens: torch.LongTensor, length: int, batch_size: int) -> tuple[float, int, torch.Tensor]:
    """(mean loss, tokens scored, mean loss per position (L-1,)) over consecutive blocks of `length`."""
    windows = blocks(tokens, length)
    if len(windows) == 0:
        raise ValueError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {length}.")
    device = next(model.parameters()).device
    per_position = torch.zeros(length - 1, dtype=torch.float64)
    for start in range(0, len(windows), batch_size):
        losses = token_losses(model, windows[start : start + batch_size].to(device)).double().cpu()
        per_position += losses.sum(0)
    per_position /= len(windows)
    return per_position.mean().item(), len(windows) * (length - 1), per_position


def sliding(model, tokens: torch.LongTensor, length: int, stride: int, batch_size: int) -> tuple[float, int]:
    """(mean loss, tokens scored) over windows of `length` advancing by `stride`; each window scores
    only the targets the previous window did not."""
    if not 0 < stride <= length:
        raise ValueError(f"stride={stride} must lie in 1..length={length}.")
    starts = list(range(0, max(tokens.numel() - length, 0) + 1, stride))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for first in range(0, len(starts), batch_size):
        batch_starts = starts[first : first + batch_size]
        windows = torch.stack([tokens[s : s + length] for s in batch_starts]).to(device)
        losses = token_losses(model, windows).double().cpu()  # (B, L-1); column j predicts token j+1
        for row, start in enumerate(batch_starts):
            # Targets the previous window did not score; with stride == length, the token at the window
            # start has no context inside the window, exactly as with non-overlapping blocks.
            scored_from = 0 if start == 0 else max(length - stride - 1, 0)
            total += losses[row, scored_from:].sum().item()
            count += length - 1 - scored_from
    return total / count, count


def evaluate_lengths(model, tokens: torch.LongTensor, lengths: list[int], modes=MODES, stride_fraction: float = 0.5,
                     batch_size: int = 4, per_position_length: int | None = None) -> dict:
    """Perplexity at every length and mode over the same text, plus one per-position loss curve."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; allowed values are {list(MODES)}.")
    limit = supported_length(model.config)
    results, curve = [], None
    for length in lengths:
        for mode in modes:
            if limit is not None and length > limit:
                results.append(LengthResult(length, mode, None, None, 0,
                                            f"unavailable: {model.config.position_encoding} has a table of {limit} "
                                            "positions"))
                continue
            if mode == "nonoverlapping":
                loss, count, per_position = nonoverlapping(model, tokens, length, batch_size)
                if length == per_position_length:
                    curve = {"length": length, "loss": per_position.tolist()}
            else:
                loss, count = sliding(model, tokens, length, max(1, int(length * stride_fraction)), batch_size)
            results.append(LengthResult(length, mode, loss, math.exp(loss), count))
    return {"results": [r.as_dict() for r in results], "per_position": curve}


def length_table(runs: dict[str, dict], mode: str) -> tuple[list[str], list[list]]:
    """Rows of lengths, one perplexity column per run (a model, or a model with a RoPE scaling)."""
    lengths = sorted({r["length"] for run in runs.values() for r in run["results"]})
    headers = ["length"] + list(runs)
    rows = []
    for length in lengths:
        row: list = [length]
        for run in runs.values():
            match = [r for r in run["results"] if r["length"] == length and r["mode"] == mode]
            row.append(match[0]["perplexity"] if match and match[0]["status"] == "ok" else None)
        rows.append(row)
    return headers, rows


def recorded_train_length(checkpoint: str) -> int | None:
    """The block size a `scripts/train.py` checkpoint was trained at, from its run record; None without one."""
    record = read_run_record(checkpoint) if Path(checkpoint).is_dir() else None
    return record.get("block_size") if record else None


def length_tables(runs: dict[str, dict]) -> str:
    """One Markdown table per mode: a row per length, a perplexity column per run."""
    modes = sorted({r["mode"] for run in runs.values() for r in run["results"]}, key=MODES.index)
    return "\n".join(f"## {mode}\n\n{markdown_table(*length_table(runs, mode))}" for mode in modes)


def write_length_report(runs: dict[str, dict], out_dir, train_length: int, title: str) -> dict[str, str]:
    """length.md (one table per mode), length.png (perplexity vs length, both modes), and
    per_position.png (loss vs position for every run that has a curve)."""
    from hf_posvariants.evaluation.report import distinct_colours, line_plot

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = sorted({r["mode"] for run in runs.values() for r in run["results"]}, key=MODES.index)
    text = [f"# {title}", "", f"Training length {train_length}; perplexity per token (– = unavailable).", "",
            length_tables(runs)]
    series, styles = {}, {}
    colours = distinct_colours(len(runs))
    for mode in modes:
        headers, rows = length_table(runs, mode)
        for column, name in enumerate(headers[1:], start=1):
            series[f"{name} ({mode})"] = ([row[0] for row in rows], [row[column] for row in rows])
            # One colour per run, named once in the legend: solid for non-overlapping, dashed for sliding windows.
            first_mode = mode == modes[0]
            styles[f"{name} ({mode})"] = {"color": colours[column - 1], "label": name if first_mode else "_nolegend_",
                                          "linestyle": "-" if mode == "nonoverlapping" else "--"}
    line_styles = {"nonoverlapping": "solid: non-overlapping windows", "sliding": "dashed: sliding windows"}
    plot_title = f"{title}\n({'; '.join(line_styles[mode] for mode in modes)})"
    (out_dir / "length.md").write_text("\n".join(text))
    line_plot(series, out_dir / "length.png", plot_title, "evaluation length (tokens)", "perplexity", log_x=True,
              log_y=True, vertical_line=train_length, styles=styles)
    curves = {name: run["per_position"] for name, run in runs.items() if run.get("per_position")}
    if curves:
        line_plot({name: (list(range(1, len(c["loss"]) + 1)), smooth(c["loss"])) for name, c in curves.items()},
                  out_dir / "per_position.png", f"{title}: loss by position", "position", "loss (nats, smoothed)",
                  vertical_line=train_length)
    return {"markdown": str(out_dir / "length.md"), "plot": str(out_dir / "length.png")}


def smooth(values: list[float], window: int = 16) -> list[float]:
    """Moving average over `window` positions, so a curve over a few blocks is readable."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if len(values) <= window:
        return values
    kernel = torch.ones(window, dtype=torch.float64) / window
    smoothed = F.conv1d(tensor[None, None], kernel[None, None]).flatten().tolist()
    return [float("nan")] * (window - 1) + smoothed
