"""The chunked causal-LM loss ≡ transformers' plain loss (values and gradients), alone, in the model, under
gradient accumulation with `num_items_in_batch`, and through the Trainer; the liger loss where it runs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, build, tiny_config
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_posvariants import PosVarDiffConfig, PosVarLlamaConfig
from hf_posvariants.lm_loss import LM_LOSSES, chunked_causal_lm_loss
from hf_posvariants.training import fused_loss  # noqa: F401  (registers "liger" where installed)


def labelled(batch: int, length: int, seed: int, ignored: float = 0.3) -> torch.LongTensor:
    """Random labels with a share of ignored (-100) positions, as padding and prompt masking leave them."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (batch, length), generator=generator)
    return labels.masked_fill(torch.rand(batch, length, generator=generator) < ignored, -100)


def plain_and_chunked(hidden, weight, labels, chunk_size, **kwargs):
    """(loss, ∂hidden, ∂weight) of transformers' loss on materialised logits and of the chunked loss."""
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if chunked:
            loss = chunked_causal_lm_loss(h, w, labels, chunk_size=chunk_size, **kwargs)
        else:
            loss = ForCausalLMLoss(h @ w.T, labels, vocab_size=w.shape[0], **kwargs)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("chunk_size", [1, 7, 24, 1000])
@pytest.mark.parametrize("num_items_in_batch", [None, 29, torch.tensor(29)], ids=["mean", "int", "tensor"])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk_size, num_items_in_batch):
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 8, 16, generator=generator), torch.randn(VOCAB, 16, generator=generator)
    (plain, *plain_grads), (chunked, *chunked_grads) = plain_and_chunked(
        hidden, weight, labelled(3, 8, 1), chunk_size, num_items_in_batch=num_items_in_batch
    )
    assert plain > 1.0
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for actual, expected in zip(chunked_grads, plain_grads):
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_chunked_loss_takes_shift_labels_as_given():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 6, 16, generator=generator), torch.randn(VOCAB, 16, generator=generator)
    shift_labels = labelled(2, 6, 2)
    (plain, *plain_grads), (chunked, *chunked_grads) = plain_and_chunked(
        hidden, weight, labelled(2, 6, 3), 5, shift_labels=shift_labels
    )
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for actual, expected in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_chunked_loss_in_bf16_stays_within_bf16_rounding_of_plain():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, 32, generator=generator).bfloat16()
    weight = (torch.randn(VOCAB, 32, generator=generator) * 0.2).bfloat16()
    (plain, *plain_grads), (chunked, *chunked_grads) = plain_and_chunked(hidden, weight, labelled(2, 16, 4), 9)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)
    for actual, expected in zip(chunked_grads, plain_grads):
        assert actual.dtype == torch.bfloat16
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-3)


def test_chunked_loss_refuses_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive"):
        chunked_causal_lm_loss(torch.randn(1, 4, 8), torch.randn(VOCAB, 8), labelled(1, 4, 0), chunk_size=0)


def causal_pair(config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same model twice, training mode: plain loss and chunked loss."""
    plain = build(AutoModelForCausalLM, config).train()
    chunked = copy.deepcopy(plain)
    chunked.use_lm_loss("chunked")
    return plain, chunked


@pytest.mark.parametrize("config_class", [PosVarLlamaConfig, PosVarDiffConfig], ids=["llama", "diff"])
def test_gradient_accumulation_with_num_items_in_batch_matches_plain(config_class):
    """Two micro-batches with different numbers of counted tokens, each normalised by the accumulated count
    as the Trainer does: the summed losses and the accumulated gradients equal the plain loss's."""
    plain, chunked = causal_pair(tiny_config(config_class, "rope"))
    ids = [torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    labels = [labelled(2, 9, 5, ignored=0.1), labelled(2, 9, 6, ignored=0.5)]
    num_items = sum(int((label[:, 1:] != -100).sum()) for label in labels)
    totals = []
    for model in (plain, chunked):
        total = 0.0
        for micro_ids, micro_labels in zip(ids, labels):
            output = model(input_ids=micro_ids, labels=micro_labels, num_items_in_batch=torch.tensor(num_items))
            output.loss.backward()
            total += output.loss.item()
        totals.append(total)
    assert (chunked(input_ids=ids[0], labels=labels[0]).logits is None) and totals[0] > 1.0
    assert totals[1] == pytest.approx(totals[0], rel=1e-6)
    for (name, expected), actual in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_evaluation_returns_logits_and_the_plain_loss():
    plain, chunked = causal_pair(tiny_config(PosVarLlamaConfig, "alibi"))
    plain.eval(), chunked.eval()
    ids, labels = torch.randint(3, VOCAB, (2, 7)), labelled(2, 7, 0)
    with torch.no_grad():
        expected, actual = plain(input_ids=ids, labels=labels), chunked(input_ids=ids, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=0)


def test_unknown_lm_loss_is_refused():
    model = build(AutoModelForCausalLM, tiny_config(PosVarLlamaConfig, "rope"))
    with pytest.raises(ValueError, match=r"lm_loss='fused' is not available; allowed values are \['plain', 'chunked'"):
        model.use_lm_loss("fused")


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (count, length), generator=generator)
        # Varying numbers of counted labels per block, so micro-batch means differ from the accumulated mean.
        self.labels = torch.stack([labelled(1, length, seed, ignored=0.1 + 0.1 * (seed % 5))[0] for seed in range(count)])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def test_trainer_with_gradient_accumulation_takes_the_same_steps(tmp_path):
    """Through the Trainer (which passes num_items_in_batch): two optimizer steps of two micro-batches each
    leave the chunked model's weights where the plain model's are (SGD: Adam would magnify rounding in
    near-zero gradients into whole learning-rate steps)."""
    plain, chunked = causal_pair(tiny_config(PosVarLlamaConfig, "rope"))
    arguments = dict(
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
        optim="sgd", use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", seed=0, data_seed=0,
        dataloader_num_workers=0,
    )
    losses = []
    for name, model in (("plain", plain), ("chunked", chunked)):
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / name), **arguments),
                          train_dataset=_Blocks(8, 10))
        losses.append(trainer.train().training_loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, expected), actual in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif("liger" not in LM_LOSSES or not torch.cuda.is_available(), reason="liger-kernel on CUDA")
def test_liger_loss_equals_plain_loss_on_gpu():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, 32, generator=generator).cuda()
    weight = torch.randn(VOCAB, 32, generator=generator).cuda()
    labels = labelled(2, 64, 0).cuda()
    results = []
    for loss_function in (None, LM_LOSSES["liger"]):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if loss_function is None:
            loss = ForCausalLMLoss(h @ w.T, labels, vocab_size=VOCAB, num_items_in_batch=torch.tensor(100))
        else:
            loss = loss_function(h, w, labels, num_items_in_batch=torch.tensor(100))
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for actual, expected in zip(*results[::-1]):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_recipe_switches_the_pipeline_to_the_chunked_loss(tmp_path):
    """`lm_loss: chunked` in a recipe (here on the command line) trains the same run as the plain loss."""
    from tests.test_training import tiny_argv, train_losses

    from hf_posvariants.training import pipeline

    extra = ("--max_steps", "10", "--gradient_accumulation_steps", "2", "--logging_steps", "5", "--eval_steps", "10",
             "--save_steps", "10", "--torch_num_threads", "1")
    runs = {}
    for lm_loss in ("plain", "chunked"):
        pipeline.main(tiny_argv(tmp_path / lm_loss, "clm", "posvar_llama", *extra, "--lm_loss", lm_loss))
        runs[lm_loss] = train_losses(tmp_path / lm_loss)
    assert len(runs["plain"]) == 2
    assert runs["chunked"] == pytest.approx(runs["plain"], rel=1e-4)


def test_pipeline_refuses_lm_loss_outside_causal_lm(tmp_path):
    from tests.test_training import tiny_argv

    from hf_posvariants.training import pipeline

    with pytest.raises(ValueError, match=r"lm_loss='chunked' applies to objective='clm'"):
        pipeline.parse(tiny_argv(tmp_path, "mlm", "posvar_llama", "--lm_loss", "chunked"))
    with pytest.raises(ValueError, match=r"lm_loss='fused' is not supported; allowed values are \['plain', 'chunked'"):
        pipeline.parse(tiny_argv(tmp_path, "clm", "posvar_llama", "--lm_loss", "fused"))
