"""Training, export and Hub tooling around the posvariants models.

Nothing here travels with a checkpoint, so it may import anything (datasets, tokenizers, evaluate,
huggingface_hub); the model files under `hf_posvariants/` stay flat and import only torch/transformers.
"""
