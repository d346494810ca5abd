"""Users' own text: documents keep their newlines, bad data fails before training with a clear error;
what a user reads: the usage at the top of --help and the summary at the end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_posvariants.training import pipeline
from hf_posvariants.training.data import load_splits
from tests.test_training import _one_thread, tiny_argv  # noqa: F401  (autouse fixture)

ANIMALS = ["the cat", "a dog", "my owl", "our fox", "an ant"]
VERBS = ["sat", "ran", "slept", "ate", "sang"]


def poem(lines: int, seed: int = 0) -> str:
    """Short lines of two-to-three words: what ends a line is learnable, and it is a newline."""
    rng = random.Random(seed)
    return "".join(f"{rng.choice(ANIMALS)} {rng.choice(VERBS)}\n" for _ in range(lines))


def test_text_files_are_documents_that_keep_their_newlines(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n\nsecond paragraph\n")
    (tmp_path / "b.txt").write_text("another file\n")
    files = {unit: load_splits(None, None, str(tmp_path), None, 0.1, 0, 0, unit)["train"]["text"]
             for unit in ("document", "paragraph", "line")}  # fmt: skip
    assert sorted(files["document"]) == ["another file\n", "line one\nline two\n\nsecond paragraph\n"]
    assert len(files["paragraph"]) == 3 and "line one\nline two" in files["paragraph"][0]
    assert files["line"][:2] == ["line one\n", "line two\n"]
    with pytest.raises(ValueError, match="text_unit='sentence'"):
        load_splits(None, None, str(tmp_path), None, 0.1, 0, 0, "sentence")


# About 12 s on one core: 200 steps of a 2-layer model, then greedy generation.
def test_a_model_trained_on_multi_line_text_generates_a_newline(tmp_path, capsys):
    corpus = tmp_path / "poem.txt"
    corpus.write_text(poem(1200))
    output = tmp_path / "run"
    pipeline.main(tiny_argv(output, "clm", "posvar_llama", "--train_file", str(corpus), "--max_steps", "200",
                            "--eval_strategy", "no", "--save_steps", "200"))  # fmt: skip
    summary = capsys.readouterr().out.split("Training finished:", 1)[1]
    assert f"{output / 'all_results.json'}" in summary
    assert f"AutoModelForCausalLM.from_pretrained({str(output)!r})" in summary

    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    prompt = tokenizer("the cat sat\nmy owl", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])
    assert "\n" in text, repr(text)
    assert not text.startswith(tokenizer.eos_token), repr(text)


def nothing_trained(folder: Path) -> bool:
    return not list(folder.glob("checkpoint-*")) and not (folder / "run_args.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("\n\n   \n\t\n", "has no text"),
        (poem(40), "too little data for a validation split"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text"),
        ("caf\u00e9 ok\n".encode("latin-1"), r"byte 0xe9 at offset 3"),
    ],
    ids=["blank lines", "too little for validation", "binary", "latin-1"],
)
def test_bad_training_text_fails_before_training(tmp_path, content, message):
    data = tmp_path / "data.txt"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    output = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        pipeline.main(tiny_argv(output, "clm", "posvar_llama", "--train_file", str(data)))
    assert nothing_trained(output)


def test_a_missing_local_model_fails_at_once(tmp_path, monkeypatch):
    output = tmp_path / "run"
    for name in (str(tmp_path / "no_such_model"), "./runs/no_such_model", "../nowhere/at/all"):
        with pytest.raises(ValueError, match=r"does not exist: it is not a local folder"):
            pipeline.main(tiny_argv(output, "clm", "posvar_llama", "--model_name_or_path", name))
    # A name that could be a Hub id is refused at once when the Hub is offline.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        pipeline.main(tiny_argv(output, "clm", "posvar_llama", "--tokenizer_name", "someone/tokenizer"))
    assert not output.exists()


def test_help_starts_with_a_short_usage(capsys):
    with pytest.raises(SystemExit):
        pipeline.parse(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: train.py RECIPE.yaml [--key value ...] [--model.field value ...]")
    head = text[: text.index("--output_dir")]
    assert "--model.field value" in head and "--key value" in head and "configs/tiny_clm.yaml" in head
    assert len(head.splitlines()) < 25


def test_eval_length_reads_the_training_length_from_the_run_record(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tests.test_evaluation import script

    corpus = tmp_path / "poem.txt"
    corpus.write_text(poem(300))
    output = tmp_path / "run"
    # block_size 32 while max_position_embeddings is 64: the old default took 64 as "1×".
    pipeline.main(tiny_argv(output, "clm", "posvar_llama", "--train_file", str(corpus), "--max_steps", "2",
                            "--eval_strategy", "no"))  # fmt: skip
    capsys.readouterr()
    result = script("eval_length").main([str(output), "--corpus", str(corpus), "--multiples", "1", "2",
                                         "--eval-tokens", "256", "--out-dir", str(tmp_path / "length")])  # fmt: skip
    assert result["train_length"] == 32
    out = capsys.readouterr().out
    assert "| length | as trained |" in out and "\n| 32 | " in out and "\n| 64 | " in out
    assert "(32, " not in out  # no tuples


def write_rows(path: Path, rows: list[dict]) -> Path:
    """The rows as JSON lines, one JSON list, or CSV (by the file's extension)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_the_text_column_is_chosen_by_name_only(tmp_path, suffix):
    texts = poem(400).splitlines()
    data = write_rows(tmp_path / f"data{suffix}", [{"id": f"row-{i}", "body": text} for i, text in enumerate(texts)])
    output = tmp_path / "run"
    with pytest.raises(ValueError, match=r"text_column='text' is not a column of the data; its columns are \['id', 'body'\]"):
        pipeline.main(tiny_argv(output, "clm", "posvar_llama", "--train_file", str(data)))
    assert nothing_trained(output)
    numbers = write_rows(tmp_path / f"numbers{suffix}", [{"text": i} for i in range(400)])
    with pytest.raises(ValueError, match="text_column='text' holds int64 values, not text"):
        pipeline.main(tiny_argv(output, "clm", "posvar_llama", "--train_file", str(numbers)))
    assert nothing_trained(output)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_rows_without_text_are_counted_and_refused_above_the_threshold(tmp_path, capsys, suffix):
    texts = poem(600).splitlines()
    # A third of the rows have no text: they lack the field (JSON) or leave the cell empty (CSV).
    rows = [{"id": i, **({"text": text} if i % 3 else {})} for i, text in enumerate(texts)]
    rows[1]["text"] = "   "
    data = write_rows(tmp_path / f"data{suffix}", rows)
    output = tmp_path / "run"
    with pytest.raises(ValueError, match=r"lost 201 of 600 rows \(33\.5%: 200 with no 'text' value \(missing or "
                                         r"null\), 1 blank .*max_dropped_fraction=0\.05"):
        pipeline.main(tiny_argv(output, "clm", "posvar_llama", "--train_file", str(data)))
    assert nothing_trained(output)
    capsys.readouterr()
    pipeline.main(tiny_argv(output, "clm", "posvar_llama", "--train_file", str(data), "--max_steps", "2",
                            "--max_dropped_fraction", "0.4", "--eval_strategy", "no"))  # fmt: skip
    out = capsys.readouterr().out
    assert f"The train data ({data}): dropped 201 of 600 rows (200 with no 'text' value" in out
    assert out.index("dropped 201") < out.index("Training finished")


def test_blank_lines_of_a_text_file_are_reported_but_not_refused(tmp_path, capsys):
    data = tmp_path / "verse.txt"
    data.write_text("\n".join(poem(4, seed) for seed in range(150)))  # a blank line after each stanza
    pipeline.main(tiny_argv(tmp_path / "run", "clm", "posvar_llama", "--train_file", str(data), "--text_unit", "line",
                            "--max_steps", "2", "--eval_strategy", "no"))  # fmt: skip
    assert "dropped 149 of 749 rows (0 with no 'text' value (missing or null), 149 blank" in capsys.readouterr().out
