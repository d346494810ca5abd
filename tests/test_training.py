

def test_finetune_from_checkpoint_on_a_folder_of_text_files(tmp_path):
    """Continue training a saved model on local text: its tokenizer is reused, JSON lines work too."""
    pipeline.main(tiny_argv(tmp_path / "base", "clm", "posvar_llama", "--max_steps", "10"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = builtin_texts(400, seed=5)
    (corpus / "a.txt").write_text("\n".join(texts[:200]) + "\n")
    (corpus / "b.txt").write_text("\n".join(texts[200:]) + "\n")
    metrics = pipeline.main(tiny_argv(tmp_path / "tuned", "clm", "posvar_llama", "--max_steps", "10",
                                      "--model_name_or_path", str(tmp_path / "base"), "--train_file", str(corpus)))  # fmt: skip
    assert metrics["train_samples"] > 0 and "eval_perplexity" in metrics
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == (tmp_path / "base" / "tokenizer.json").read_text()
    record = json.loads((tmp_path / "tuned" / "run_args.json").read_text())
    assert record["init"] == str(tmp_path / "base") and record["dataset"] == str(corpus)

    lines = tmp_path / "lines.jsonl"
    lines.write_text("".join(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(texts)))
    metrics = pipeline.main(tiny_argv(tmp_path / "jsonl", "clm", "posvar_llama", "--max_steps", "5",
                                      "--train_file", str(lines), "--text_column", "body"))  # fmt: skip
    assert metrics["eval_loss"] > 0
    with pytest.raises(ValueError, match="text_column='txt'"):
        pipeline.main(tiny_argv(tmp_path / "bad", "clm", "posvar_llama", "--train_file", str(lines), "--text_column", "txt"))
