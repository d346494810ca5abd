"""Position probes: tasks that need a model to find or reproduce tokens at a given distance.

- passkey: a five-digit key hidden at a relative depth in filler text, asked for at the end
  (Mohtashami & Jaggi, "Landmark Attention", 2023);
- copy: a random letter string, then the instruction to repeat it; the answer is the string;
- associative recall: key=value pairs, then one key; the answer is its value
  (Ba et al. 2016; Fu et al., "Hungry Hungry Hippos", 2023).

Each example is rendered to exactly `length` tokens with any tokenizer: pieces of text are encoded
separately and concatenated, so the count is exact. Accuracy is exact match of the greedy answer,
computed in one forward pass: with teacher forcing, every answer token is the argmax given the
correct prefix iff greedy decoding produces the whole answer.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class ProbeExample:
    input_ids: list[int]
    answer_start: int  # the answer is input_ids[answer_start:]


class Renderer:
    """Encodes text pieces once and assembles examples of an exact token length."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def filler(self, count: int, offset: int = 0) -> list[int]:
        unit = self.ids(FILLER)
        repeated = unit * ((offset + count) // len(unit) + 1)
        return repeated[offset : offset + count]

    def assemble(self, length: int, head: list[int], tail: list[int], answer: list[int], task: str) -> ProbeExample:
        """head + filler + tail + answer, with filler making it exactly `length` tokens."""
        room = length - len(head) - len(tail) - len(answer)
        if room < 0:
            raise ValueError(f"length={length} is too short for the {task} probe; it needs at least "
                             f"{len(head) + len(tail) + len(answer)} tokens.")
        ids = head + self.filler(room) + tail + answer
        return ProbeExample(ids, length - len(answer))


def passkey(renderer: Renderer, length: int, rng: random.Random, depth: float = 0.5) -> ProbeExample:
    key = f"{rng.randrange(10_000, 100_000)}"
    intro = renderer.ids("There is a pass key hidden in this text. Remember it. ")
    needle = renderer.ids(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    question = renderer.ids("What is the pass key? The pass key is ")
    answer = renderer.ids(key)
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"length={length} is too short for the passkey probe; it needs at least "
                         f"{length - room} tokens.")
    before = round(room * depth)
    ids = intro + renderer.filler(before) + needle + renderer.filler(room - before, before) + question + answer
    return ProbeExample(ids, length - len(answer))


def copy(renderer: Renderer, length: int, rng: random.Random, depth: float = 0.5) -> ProbeExample:
    """The string fills the space the two copies and the instructions leave, so distance grows with length."""
    intro, instruction = renderer.ids("Copy: "), renderer.ids(" | Again: ")
    letters = [renderer.ids(letter) for letter in string.ascii_lowercase]
    budget = (length - len(intro) - len(instruction)) // 2
    content: list[int] = []
    while True:
        piece = rng.choice(letters)
        if len(content) + len(piece) > budget:
            break
        content += piece
    return renderer.assemble(length, intro, content + instruction, content, "copy")


def associative_recall(renderer: Renderer, length: int, rng: random.Random, depth: float = 0.5) -> ProbeExample:
    """As many distinct key=value pairs as fit; the queried pair sits at `depth` of the list."""
    question, end = renderer.ids(" Query: "), renderer.ids(".")
    keys = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    rng.shuffle(keys)
    # Room kept for the query, whichever key it asks: its "key=" plus a one-digit answer.
    reserve = len(end) + len(question) + max(len(renderer.ids(f"{key}=")) + len(renderer.ids("0")) for key in keys)
    pairs: list[tuple[str, str]] = []
    used = reserve
    for key in keys:
        pair = (key, str(rng.randrange(10)))
        cost = len(renderer.ids(f"{key}={pair[1]} "))
        if used + cost > length:
            break
        pairs.append(pair)
        used += cost
    if not pairs:
        raise ValueError(f"length={length} is too short for the associative_recall probe.")
    target = pairs[min(int(depth * len(pairs)), len(pairs) - 1)]
    listing = [token for key, value in pairs for token in renderer.ids(f"{key}={value} ")]
    tail = end + question + renderer.ids(f"{target[0]}=")
    return renderer.assemble(length, [], listing + tail, renderer.ids(target[1]), "associative_recall")


PROBES: dict[str, Callable[..., ProbeExample]] = {
    "passkey": passkey,
    "copy": copy,
    "associative_recall": associative_recall,
}


def render(task: str, tokenizer: PreTrainedTokenizerBase, length: int, count: int, depth: float = 0.5,
           seed: int = 0) -> list[ProbeExample]:
    if task not in PROBES:
        raise ValueError(f"task={task!r} is not supported; allowed values are {sorted(PROBES)}.")
    renderer, rng = Renderer(tokenizer), random.Random(f"{task}-{length}-{depth}-{seed}")
    return [PROBES[task](renderer, length, rng, depth) for _ in range(count)]


@torch.no_grad()
def accuracy(model, examples: list[ProbeExample], batch_size: int = 8) -> float:
    """Share of examples whose whole answer is the greedy continuation (teacher-forced argmax)."""
    device = next(model.parameters()).device
    correct = 0
    for first in range(0, len(examples), batch_size):
        batch = examples[first : first + batch_size]
        input_ids = torch.tensor([example.input_ids for example in batch], device=device)
        predictions = model(input_ids=input_ids, use_cache=False).logits.argmax(-1)  # (B, L)
        for row, example in enumerate(batch):
            answer = input_ids[row, example.answer_start :]
            predicted = predictions[row, example.answer_start - 1 : -1]  # logits at t predict token t+1
            correct += bool((predicted == answer).all())
    return correct / len(examples)


def probe_sweep(model, tokenizer, tasks: list[str], lengths: list[int], depths: list[float], count: int,
                batch_size: int = 8, seed: int = 0) -> list[dict]:
    """Accuracy for every task × length (× depth for passkey; other tasks use depth 0.5). Lengths
    beyond a bounded position table are reported as unavailable."""
    from hf_posvariants.evaluation.length import supported_length

    limit = supported_length(model.config)
    rows = []
    for task in tasks:
        for length in lengths:
            for depth in depths if task == "passkey" else [0.5]:
                row = {"task": task, "length": length, "depth": depth, "accuracy": None, "status": "ok"}
                if limit is not None and length > limit:
                    row["status"] = f"unavailable beyond {limit} positions"
                else:
                    try:
                        examples = render(task, tokenizer, length, count, depth, seed)
                    except ValueError as error:  # the task does not fit in so few tokens
                        row["status"] = str(error)
                    else:
                        row["accuracy"] = accuracy(model, examples, batch_size)
                rows.append(row)
    return rows


def write_probe_report(runs: dict[str, list[dict]], out_dir) -> None:
    """probes.md (one table per task: lengths × runs) and probes.png (accuracy vs length)."""
    from pathlib import Path

    from hf_posvariants.evaluation.report import line_plot, markdown_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text, series = ["# Position probes", "", "Exact-match accuracy of the greedy answer (– = unavailable).", ""], {}
    conditions = sorted({(r["task"], r["depth"]) for rows in runs.values() for r in rows})
    for task, depth in conditions:
        lengths = sorted({r["length"] for rows in runs.values() for r in rows if r["task"] == task})
        table = []
        for length in lengths:
            table.append([length] + [next((r["accuracy"] for r in rows if (r["task"], r["depth"], r["length"])
                                           == (task, depth, length)), None) for rows in runs.values()])
        name = task if task != "passkey" else f"passkey at depth {depth:g}"
        text += [f"## {name}", "", markdown_table(["length", *runs], table)]
        for column, run in enumerate(runs, start=1):
            series[f"{run}: {name}"] = (lengths, [row[column] for row in table])
    (out_dir / "probes.md").write_text("\n".join(text))
    line_plot(series, out_dir / "probes.png", "Position probes", "length (tokens)", "accuracy", log_x=True)
