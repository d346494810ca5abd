#!/usr/bin/env python
"""Push a trained checkpoint folder to the Hub as a remote-code model with a rendered model card.

    python scripts/push_to_hub.py runs/tiny_clm your-name/tiny-posvar-llama [--private] [--dry_run]

The folder is first made loadable without this package (full `auto_map`, flat model code), then
README.md is rendered from model_cards/posvariants.md and every file goes up in one commit.
`--dry_run` writes the card and lists the files without contacting the Hub.
"""

import argparse

from transformers import AutoConfig

import hf_posvariants  # noqa: F401  (registers the families, so AutoConfig knows posvar_* types)
from hf_posvariants.training.export import make_remote_loadable
from hf_posvariants.training.hub import CARD_FILE, TEMPLATE, push_folder, render_model_card


def main(argv=None, api=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="checkpoint folder written by scripts/train.py")
    parser.add_argument("repo_id", help="Hub repository, namespace/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--dry_run", action="store_true", help="render the card and list files only")
    parser.add_argument("--template", default=str(TEMPLATE), help="model card template (Jinja, YAML header)")
    args = parser.parse_args(argv)

    config = AutoConfig.from_pretrained(args.folder)
    make_remote_loadable(args.folder, type(config))
    card = render_model_card(args.folder, args.repo_id, args.template)
    if args.dry_run:
        card.save(f"{args.folder}/{CARD_FILE}")
        print(card.content)
        return []
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=args.token)
    uploaded = push_folder(args.folder, args.repo_id, api, "Upload posvariants model", private=args.private, card=card)
    print(f"pushed {len(uploaded)} files to https://huggingface.co/{args.repo_id}")
    return uploaded


if __name__ == "__main__":
    main()
