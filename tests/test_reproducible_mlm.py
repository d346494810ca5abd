"""Masked-LM runs repeat exactly: the WordPiece tokenizer numbers its tokens the same way every time,
and a run resumed from a checkpoint masks, and so trains, bit for bit like an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hf_posvariants.training import pipeline
from hf_posvariants.training.tokenizer import train_masked_tokenizer
from tests.test_training import ROOT, _one_thread, tiny_argv  # noqa: F401  (autouse fixture)

CORPUS = Path("/work/shared/data/tinyshakespeare/input.txt")
# Each process seeds Rust's hash maps afresh: train in another one and print the vocabulary.
TRAIN_AND_PRINT = """
import json, sys
from hf_posvariants.training.tokenizer import train_masked_tokenizer
lines = open(sys.argv[1]).read().splitlines()[:4000]
print(json.dumps(train_masked_tokenizer(lines, 600).get_vocab(), sort_keys=True))
"""


def shakespeare(tmp_path: Path) -> Path:
    """Real English text: many words tie in frequency, which is where a hash order shows."""
    if CORPUS.is_file():
        return CORPUS
    words = ["thou", "thee", "king", "lord", "sweet", "night", "love", "death", "crown", "sword", "heart", "blood"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(words[(i * 7 + j * 5) % len(words)] for j in range(i % 9 + 3)) for i in range(4000)))
    return path


def test_the_wordpiece_tokenizer_numbers_its_tokens_the_same_in_every_process(tmp_path):
    corpus = shakespeare(tmp_path)
    child = subprocess.run([sys.executable, "-c", TRAIN_AND_PRINT, str(corpus)], capture_output=True, text=True,
                           check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})  # fmt: skip
    lines = corpus.read_text().splitlines()[:4000]
    tokenizers = [train_masked_tokenizer(lines, 600) for _ in range(2)]
    vocabulary = tokenizers[0].get_vocab()
    assert len(vocabulary) == 600
    assert vocabulary == tokenizers[1].get_vocab() == json.loads(child.stdout.strip().splitlines()[-1])
    # Only BERT's five tokens are special (the continuation tokens are ordinary vocabulary).
    tokenizer = tokenizers[0]
    assert sorted(tokenizer.all_special_tokens) == ["[CLS]", "[MASK]", "[PAD]", "[SEP]", "[UNK]"]
    with pytest.raises(TypeError, match="not an iterator"):
        train_masked_tokenizer(iter(["a b c"]), 100)


class CrashAt(pipeline.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"crash at step {self.step}")


def test_a_resumed_masked_lm_run_matches_an_uninterrupted_one_bitwise(tmp_path, capsys):
    def argv(folder: Path) -> list[str]:
        return tiny_argv(folder, "mlm", "posvar_llama", "--max_steps", "12", "--save_steps", "4",
                         "--eval_strategy", "no", "--logging_steps", "4")  # fmt: skip

    pipeline.main(argv(tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(argv(tmp_path / "resumed"), callbacks=[CrashAt(6)])
    capsys.readouterr()
    pipeline.main(argv(tmp_path / "resumed"))  # the same command: resumes from checkpoint-4
    assert f"Resuming from {tmp_path / 'resumed' / 'checkpoint-4'}" in capsys.readouterr().out
    # Each run trained its own tokenizer: the weights can only agree if the tokenizers do.
    straight, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(
        tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(straight[key].equal(resumed[key]) for key in straight)
    logged = [json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"] for run in ("straight", "resumed")]
    assert [entry["loss"] for entry in logged[0] if "loss" in entry][-1] == [entry["loss"] for entry in logged[1] if "loss" in entry][-1]
