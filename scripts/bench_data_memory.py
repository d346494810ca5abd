#!/usr/bin/env python
"""Peak memory of training on a big .txt file: data preparation (reading, tokenizer training,
tokenizing, packing) and a few training steps, for files of growing size.

    PYTHONPATH=$PWD python scripts/bench_data_memory.py --sizes-mb 20 200 1000 --work-dir /tmp/bench_data
    PYTHONPATH=$PWD python scripts/bench_data_memory.py --sizes-mb 20 --blocks 6450000  # training part of 1 GiB

Each size runs in a fresh process: `scripts/train.py configs/tiny_clm.yaml` on one file (the default
text_unit, document: the whole file is one text) with a small validation file, so evaluation stays
short. The corpus is the text files given (by default those in /work/shared/data, else this repository's
README), repeated to the size asked, in --work-dir, never in the repository. Prints a Markdown table
per size: peak resident memory of the run's process (ru_maxrss), of which memory-mapped files (the
`datasets` Arrow cache, page cache the kernel can drop) are a part, its peak anonymous memory
(RssAnon sampled every 50 ms: what cannot be dropped) over the run and from the start of training on,
and the wall time. `--blocks N` adds a run on the smallest corpus whose packed blocks are repeated to N
(6,450,000 are those of 1 GiB): the training part of a big corpus (its shuffled order of N blocks)
without the half hour of tokenizing one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCES = sorted(Path("/work/shared/data").glob("*/*.txt")) + sorted(Path("/work/shared/data").glob("*/*.raw"))
MB = 1 << 20

# What the child runs: the pipeline, then its own peak RSS and anonymous RSS (KiB, over the whole run and from
# the start of training on) and the number of blocks. With a block count (argv[3] > 0), the training data is the
# packed blocks repeated to that many: training as on a corpus that packs into them, without tokenizing one.
CHILD = """
import json, resource, sys, threading, time
import torch
from transformers import TrainerCallback
from hf_posvariants.training import pipeline
peak_anon, training = [0, 0], [False]

def sample():
    while True:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("RssAnon:"))
        peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
        if training[0]:
            peak_anon[1] = max(peak_anon[1], int(line.split()[1]))
        time.sleep(0.05)

class TrainingStarts(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        training[0] = True

class RepeatedBlocks(torch.utils.data.Dataset):
    def __init__(self, blocks, length):
        self.blocks, self.length = blocks, length
    def __len__(self):
        return self.length
    def __getitem__(self, index):
        return self.blocks[index % len(self.blocks)]

def repeated_task_inputs(*args):
    datasets_, *rest = task_inputs(*args)
    return ({**datasets_, "train": RepeatedBlocks(datasets_["train"], int(sys.argv[3]))}, *rest)

if int(sys.argv[3]) > 0:
    task_inputs, pipeline.task_inputs = pipeline.task_inputs, repeated_task_inputs
threading.Thread(target=sample, daemon=True).start()
result = pipeline.train_recipe(sys.argv[1], json.loads(sys.argv[2]), callbacks=[TrainingStarts()])
print("BENCH", json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                           "peak_anon_kib": peak_anon[0], "training_anon_kib": peak_anon[1],
                           "train_samples": result.metrics["train_samples"]}))
"""


def build_corpus(path: Path, size: int, sources: list[Path]) -> Path:
    """`size` bytes of the sources' text, repeated (cut at a line end); reused when already there."""
    if path.is_file() and path.stat().st_size == size:
        return path
    text = "".join(source.read_text(encoding="utf-8", errors="ignore") for source in sources)
    with open(path, "w", encoding="utf-8") as handle:
        written = 0
        while written < size:
            part = text[: size - written]
            part = part[: part.rfind("\n") + 1] or part
            handle.write(part)
            written += len(part.encode())
    return path


def run_size(size_mb: int, work_dir: Path, sources: list[Path], validation: Path, steps: int,
             blocks: int = 0) -> dict:  # fmt: skip
    corpus = build_corpus(work_dir / f"corpus_{size_mb}mb.txt", size_mb * MB, sources)
    overrides = {"train_file": str(corpus), "validation_file": str(validation), "output_dir": str(work_dir / f"run_{size_mb}mb"),
                 "overwrite_output_dir": True, "max_steps": steps, "save_steps": steps, "eval_strategy": "no",
                 "logging_steps": steps, "tokenizer_vocab_size": 1000, "disable_tqdm": True}  # fmt: skip
    cache = work_dir / f"datasets_cache_{size_mb}mb"  # fresh: a cached dataset would skip the work measured
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "configs" / "tiny_clm.yaml"), json.dumps(overrides),
                            str(blocks)],
                           env=env, capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    if child.returncode != 0:
        raise SystemExit(f"{size_mb} MB failed:\n{child.stderr[-3000:]}")
    line = next(line for line in child.stdout.splitlines() if line.startswith("BENCH "))
    result = json.loads(line.removeprefix("BENCH "))
    return {"size_mb": size_mb, "peak_mb": result["peak_kib"] / 1024, "peak_anon_mb": result["peak_anon_kib"] / 1024,
            "training_anon_mb": result["training_anon_kib"] / 1024, "seconds": seconds,
            "blocks": result["train_samples"]}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[20, 200, 1000], help="corpus sizes, MiB")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_data"), help="corpora, runs and cache")
    parser.add_argument("--sources", type=Path, nargs="+", default=None, help="text files to repeat")
    parser.add_argument("--steps", type=int, default=5, help="training steps after the data is prepared")
    parser.add_argument("--blocks", type=int, nargs="+", default=[],
                        help="also train on the smallest corpus's blocks repeated to each of these counts "
                             "(6450000: those of 1 GiB): the training part of a big corpus, untokenized")  # fmt: skip
    args = parser.parse_args(argv)
    if ROOT in args.work_dir.resolve().parents:
        raise SystemExit(f"--work-dir={args.work_dir} is inside the repository; use a folder outside it (e.g. /tmp).")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    sources = args.sources or DEFAULT_SOURCES or [ROOT / "README.md"]
    validation = build_corpus(args.work_dir / "validation.txt", MB // 4, sources)
    rows = []
    print("| corpus | peak RSS | peak anonymous RSS | of it, training | wall time | training blocks |\n"
          "|---:|---:|---:|---:|---:|---:|", flush=True)  # fmt: skip
    runs = [(size_mb, 0) for size_mb in args.sizes_mb] + [(min(args.sizes_mb), blocks) for blocks in args.blocks]
    for size_mb, blocks in runs:
        row = run_size(size_mb, args.work_dir, sources, validation, args.steps, blocks)
        rows.append(row)
        corpus = f"{size_mb} MiB" + (" repeated" if blocks else "")
        print(f"| {corpus} | {row['peak_mb']:.0f} MiB | {row['peak_anon_mb']:.0f} MiB | {row['training_anon_mb']:.0f} "
              f"MiB | {row['seconds']:.0f} s | {row['blocks']:,} |", flush=True)  # fmt: skip
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    return rows


if __name__ == "__main__":
    main()
