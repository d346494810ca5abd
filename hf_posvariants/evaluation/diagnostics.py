"""Attention diagnostics of a causal checkpoint, per layer and head.

- mean attention distance: Σ_j w_ij·|i − j| averaged over queries i — how far back a head looks;
- entropy: −Σ_j w_ij·log w_ij (nats) averaged over queries — how spread its attention is
  (0 = one key; log(i+1) = uniform over the causal prefix);
- λ of differential attention layers (Ye et al., "Differential Transformer", 2024):
  λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init, read from every module that has it.

Weights come from the eager kernel (`output_attentions=True`), the only backend that returns them.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_posvariants.bias_route import MAP_BACKENDS


@torch.no_grad()
def attention_statistics(model: nn.Module, input_ids: torch.LongTensor) -> list[dict]:
    """One row per layer and head: mean distance and entropy over the batch and all query positions."""
    if model.config._attn_implementation not in MAP_BACKENDS:
        model.set_attn_implementation(MAP_BACKENDS[0])
    attentions = model(input_ids=input_ids, output_attentions=True, use_cache=False).attentions
    if not attentions:
        raise ValueError(f"{type(model).__name__} returned no attention weights with output_attentions=True.")
    length = input_ids.shape[1]
    slots = torch.arange(length, dtype=torch.float32)
    distance = (slots[:, None] - slots[None, :]).abs()  # (Q, K)
    rows = []
    for layer, weights in enumerate(attentions):
        weights = weights.float()  # (B, H, Q, K)
        mean_distance = (weights * distance).sum(-1).mean(dim=(0, 2))  # (H,)
        # Differential layers may return signed weights; entropy is defined on the non-negative part.
        positive = weights.clamp(min=0)
        entropy = -(positive * positive.clamp(min=1e-12).log()).sum(-1).mean(dim=(0, 2))
        for head in range(weights.shape[1]):
            rows.append({"layer": layer, "head": head, "mean_distance": mean_distance[head].item(),
                         "entropy": entropy[head].item()})
    return rows


@torch.no_grad()
def differential_lambdas(model: nn.Module) -> list[dict]:
    """λ of every differential attention module, in layer order (empty when there are none)."""
    rows = []
    for name, module in model.named_modules():
        if callable(getattr(module, "differential_lambda", None)):
            value = module.differential_lambda()
        elif all(hasattr(module, f"lambda_{part}") for part in ("q1", "k1", "q2", "k2", "init")):
            # transformers' DiffLlama keeps the same four vectors and λ_init.
            first = torch.exp(torch.dot(module.lambda_q1.float(), module.lambda_k1.float()))
            second = torch.exp(torch.dot(module.lambda_q2.float(), module.lambda_k2.float()))
            value = first - second + float(module.lambda_init)
        else:
            continue
        rows.append({"module": name, "lambda": float(value), "lambda_init": float(module.lambda_init)})
    return rows


def write_diagnostics_report(statistics: list[dict], lambdas: list[dict], out_dir, title: str) -> None:
    """diagnostics.md (tables) and diagnostics.png (heat maps of distance and entropy, layer × head)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_posvariants.evaluation.report import markdown_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = [f"# Attention diagnostics: {title}", "", "## Per layer and head", "",
            markdown_table(["layer", "head", "mean distance", "entropy (nats)"],
                           [[r["layer"], r["head"], r["mean_distance"], r["entropy"]] for r in statistics])]
    if lambdas:
        text += ["## Differential attention λ", "",
                 markdown_table(["module", "λ", "λ_init"], [[r["module"], r["lambda"], r["lambda_init"]] for r in lambdas])]
    (out_dir / "diagnostics.md").write_text("\n".join(text))

    layers = max(r["layer"] for r in statistics) + 1
    heads = max(r["head"] for r in statistics) + 1
    figure, axes = plt.subplots(1, 2, figsize=(9, 3 + 0.3 * layers))
    for axis, key, label in ((axes[0], "mean_distance", "mean attention distance"), (axes[1], "entropy", "entropy")):
        grid = torch.zeros(layers, heads)
        for r in statistics:
            grid[r["layer"], r["head"]] = r[key]
        image = axis.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        axis.set_title(label)
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        figure.colorbar(image, ax=axis)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_dir / "diagnostics.png", dpi=110)
    plt.close(figure)
