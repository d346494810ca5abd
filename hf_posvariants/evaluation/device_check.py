"""Numerical checks of every family × position encoding on one device: what the CPU test suite proves, re-run
where the kernels differ (CUDA's SDPA picks flash or memory-efficient kernels, flex compiles to Triton).

For each case, a tiny model in fp32: eager ≡ SDPA logits on a padded batch (and ≡ flex where asked and the
encoding runs there), cached greedy generation ≡ greedy decoding that recomputes the whole sequence, and a
bf16-autocast training step on the padded batch with a finite loss and finite gradients. `run_device_checks`
returns one row per case; `scripts/device_check.py` prints them and exits non-zero on any failure.
"""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hf_posvariants import FAMILIES, POSITION_ENCODINGS
from hf_posvariants.configuration_deberta import INPUT_POSITION_KINDS
from hf_posvariants.evaluation.bench.measurement import describe
from hf_posvariants.position_encodings import selectable_position_encodings

VOCAB = 61
# fp32 on every backend; CUDA's reductions run in another order than the CPU's.
LOGITS_ATOL = {"cpu": 1e-5, "cuda": 2e-4}


@dataclass
class CheckCase:
    """One family × encoding × head; `flex` adds the flex-attention comparison."""

    config_class: type
    encoding: str
    auto_class: type
    flex: bool = False

    @property
    def label(self) -> str:
        head = "clm" if self.auto_class is AutoModelForCausalLM else "mlm"
        return f"{self.config_class.model_type}/{self.encoding}/{head}"


@dataclass
class CheckResult:
    case: CheckCase
    failures: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"case": self.case.label, "passed": not self.failures, "checks": self.checks,
                "failures": self.failures, "seconds": round(self.seconds, 2)}


def check_cases(encodings: list[str] | None = None, flex_encodings: tuple[str, ...] = ()) -> list[CheckCase]:
    """Every family with both heads × every selectable encoding (or `encodings`), and DeBERTa's masked LM with
    every input encoding it takes; flex is compared for `flex_encodings` where the encoding declares it, on the
    causal heads of the standard-attention families."""
    chosen = sorted(encodings or selectable_position_encodings())
    unknown = sorted(set(chosen) - set(POSITION_ENCODINGS))
    if unknown:
        raise ValueError(f"encodings {unknown} are not registered; allowed values are {sorted(POSITION_ENCODINGS)}.")
    cases = []
    for config_class, heads in FAMILIES.items():
        deberta = config_class.attention_variant == "disentangled"
        for encoding in chosen:
            if deberta and POSITION_ENCODINGS[encoding].kind not in INPUT_POSITION_KINDS:
                continue
            for auto_class in (AutoModelForCausalLM, AutoModelForMaskedLM):
                if auto_class in heads:
                    # flex compiles per score function and shape: compared on the decoders of standard attention
                    flex = (encoding in flex_encodings and auto_class is AutoModelForCausalLM
                            and config_class.attention_variant == "standard" and _runs_on("flex_attention", encoding))
                    cases.append(CheckCase(config_class, encoding, auto_class, flex))
    return cases


def _runs_on(backend: str, encoding: str) -> bool:
    backends = POSITION_ENCODINGS[encoding].backends
    return backends is None or backend in backends


def tiny_config(config_class: type, encoding: str, **overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  position_encoding=encoding, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if config_class.attention_variant == "disentangled":  # a key head per query head, short log buckets
        fields.update(num_key_value_heads=4, position_buckets=8)
    fields.update(overrides)
    return config_class(**fields)


def _build(case: CheckCase, backend: str, device: str):
    torch.manual_seed(0)
    config = copy.deepcopy(tiny_config(case.config_class, case.encoding))
    return case.auto_class.from_config(config, attn_implementation=backend).to(device).eval()


def padded_batch(causal: bool, device: str, lengths: tuple[int, ...] = (11, 7)):
    """Decoders pad on the left (as for generation), encoders on the right."""
    width = max(lengths)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, slice(width - length, width) if causal else slice(0, length)] = 1
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def _greedy_by_recomputing(model, ids, mask, steps: int):
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def _compare_logits(result: CheckResult, name: str, reference, candidate, keep, atol: float) -> None:
    gap = (candidate - reference)[keep].abs().max().item()
    result.checks.append(f"{name} {gap:.1e}")
    if not gap <= atol:
        result.failures.append(f"{name}: max |Δ logits| {gap:.2e} > {atol:g}")


def run_case(case: CheckCase, device: str, new_tokens: int = 6) -> CheckResult:
    """The checks of one case; an exception is a failure of the check it happened in, not of the run."""
    result, begin = CheckResult(case), time.perf_counter()
    causal = case.auto_class is AutoModelForCausalLM
    atol = LOGITS_ATOL.get(torch.device(device).type, 2e-4)
    stage = "build"
    try:
        eager, sdpa = _build(case, "eager", device), _build(case, "sdpa", device)
        ids, mask = padded_batch(causal, device)
        keep = mask.bool()
        stage = "eager vs sdpa"
        with torch.no_grad():
            reference = eager(input_ids=ids, attention_mask=mask).logits
            _compare_logits(result, "sdpa", reference, sdpa(input_ids=ids, attention_mask=mask).logits, keep, atol)
        if case.flex:
            stage = "eager vs flex"
            flex = _build(case, "flex_attention", device)
            with torch.no_grad():
                _compare_logits(result, "flex", reference, flex(input_ids=ids, attention_mask=mask).logits, keep,
                                atol)
        if causal:
            stage = "cached generate"
            generated = sdpa.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0)
            result.checks.append("generate")
            if not torch.equal(generated, _greedy_by_recomputing(sdpa, ids, mask, new_tokens)):
                result.failures.append("cached greedy generation differs from recomputing")
        stage = "bf16 training step"
        sdpa.train()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = sdpa(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        result.checks.append("bf16 step")
        grads = [p.grad for p in sdpa.parameters() if p.grad is not None]
        if not torch.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads):
            result.failures.append("bf16 training step: non-finite loss or gradient")
    except Exception as error:  # report and go on: one broken case must not hide the others
        result.failures.append(f"{stage}: {describe(error)}")
        traceback.print_exc(limit=4)
    result.seconds = time.perf_counter() - begin
    return result


def run_device_checks(device: str, encodings: list[str] | None = None, flex_encodings: tuple[str, ...] = (),
                      log=print) -> list[CheckResult]:
    results = []
    for case in check_cases(encodings, flex_encodings):
        result = run_case(case, device)
        log(f"{'ok  ' if not result.failures else 'FAIL'} {case.label} ({result.seconds:.1f} s): "
            f"{'; '.join(result.failures or result.checks)}")
        results.append(result)
    return results
