#!/usr/bin/env python
"""Train or fine-tune a posvariants model from a YAML recipe, with command-line overrides.

    python scripts/train.py configs/tiny_clm.yaml
    python scripts/train.py configs/tiny_mlm.yaml --model.position_encoding alibi --max_steps 100
    torchrun --nproc_per_node 2 scripts/train.py configs/tiny_clm.yaml          # data parallel on CPUs
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8 scripts/train.py configs/base_clm.yaml

Running the same command again resumes the run. With `--enable_jit_checkpoint true`, SIGTERM saves a
checkpoint at the end of the step under way and exits with status 143 (128 + SIGTERM): the run is not
finished, and the same command resumes it. The pipeline lives in `hf_posvariants.training.pipeline`;
`--help` lists every argument.
"""

import sys

from hf_posvariants.training.pipeline import main

if __name__ == "__main__":
    main(sys.argv[1:])
