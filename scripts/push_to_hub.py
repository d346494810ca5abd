#!/usr/bin/env python
"""Push a trained model folder to the Hub as a remote-code model with a rendered model card.

    python scripts/push_to_hub.py runs/tiny_clm your-name/tiny-posvar-llama [--private] [--dry_run] [--as-llama]

A staged copy of the folder (links to its files; the folder itself is left as it is) is made loadable without
this package (full `auto_map`, flat model code), README.md is rendered from the package's
model_cards/posvariants.md, and the model files (weights, config, code,
tokenizer, card, run record and results; no checkpoints, optimizer states or pickles) go up in one
commit. Only files on that allow list are sent: any other file is left out and named, a file that looks
like a secret (.env, *.pem, id_rsa*, *credentials*, *secret*, *token*, …) stops the push, and the card and
run record name the data (file name and SHA-256), never a local path. `--dry_run` lists what would be
sent, prints the rendered card and changes nothing. `--as-llama` pushes the folder's export as transformers'
own `LlamaForCausalLM` instead (no model code, no remote code; refused unless the model is exactly a Llama).
The token comes from `--token`, HF_TOKEN or `hf auth login`, and is never written anywhere.
"""

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi
from transformers import AutoConfig

from hf_posvariants import FAMILIES, PosVarConfig  # (registers the families, so AutoConfig knows posvar_* types)
from hf_posvariants.conversion import export_llama
from hf_posvariants.training.export import make_remote_loadable
from hf_posvariants.training.hub import CARD_FILE, TEMPLATE, HubPusher, render_model_card, select_files
from hf_posvariants.training.run_folder import check_model_folder


def main(argv=None) -> list[str]:
    """Push (or with --dry_run, list) the folder's model files; returns their paths in the repository."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="model folder written by scripts/train.py (or one of its checkpoints)")
    parser.add_argument("repo_id", help="Hub repository, namespace/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the logged-in one); never saved")
    parser.add_argument("--dry_run", action="store_true", help="list the files that would be sent; change nothing")
    parser.add_argument("--template", default=str(TEMPLATE), help="model card template (Jinja, YAML header)")
    parser.add_argument("--as-llama", "--as_llama", dest="as_llama", action="store_true",
                        help="push the model exported as a plain LlamaForCausalLM (refused unless exactly a Llama)")
    args = parser.parse_args(argv)
    check_model_folder(Path(args.folder), "folder")
    if args.as_llama:
        return push_as_llama(args)

    config = AutoConfig.from_pretrained(args.folder)
    if not isinstance(config, PosVarConfig):  # the card and the remote code describe a posvariants family
        raise ValueError(
            f"{args.folder} holds model_type={config.model_type!r}, not a posvariants model (allowed: "
            f"{sorted(family.model_type for family in FAMILIES)}); an export_llama.py folder is pushed from its "
            "trained folder with --as-llama."
        )
    selection = select_files(args.folder)  # refuses a folder holding secret-looking files
    if selection.left_out:
        print(f"Left out (not model files): {', '.join(selection.left_out)}")
    if args.dry_run:
        files = sorted({*selection.files, CARD_FILE})
        print(f"Would push {len(files)} files from {args.folder} to https://huggingface.co/{args.repo_id} "
              f"({CARD_FILE} rendered from {args.template}):")
        print("\n".join(f"  {path}" for path in files))
        print(card_preview(render_model_card(args.folder, args.repo_id, args.template)))
        return files
    pusher = HubPusher(HfApi(token=args.token), args.repo_id, "end", private=args.private)
    pusher.check_access()
    with staged(Path(args.folder)) as folder:
        make_remote_loadable(folder, type(config))
        render_model_card(args.folder, args.repo_id, args.template).save(folder / CARD_FILE)
        pusher.push_final(folder, "Upload posvariants model")
        files = select_files(folder).files
    print(f"Pushed {len(files)} files to https://huggingface.co/{args.repo_id}")
    return files


@contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A temporary folder of links to `folder`'s files, less the two a push writes (config.json with the full
    auto_map is copied, the card is rendered anew): the trained folder is left as it was, so a sealed checkpoint's
    files keep the sizes its record holds and resuming still takes it."""
    with tempfile.TemporaryDirectory() as staging:
        stage = Path(staging)
        for path in folder.iterdir():
            if path.name == "config.json":
                shutil.copy2(path, stage / path.name)
            elif path.is_file() and path.name != CARD_FILE:
                (stage / path.name).symlink_to(path.resolve())
        yield stage


def card_preview(card) -> str:
    """The rendered card as a dry run shows it (rendering it there makes a missing template fail the dry run)."""
    return f"--- {CARD_FILE} ---\n{card.content}"


def push_as_llama(args) -> list[str]:
    """--as-llama: the folder exported as a plain LlamaForCausalLM into a temporary folder, with its card, listed
    (--dry_run) or pushed; the trained folder itself is left as it is."""
    select_files(args.folder)  # the trained folder holding secret-looking files stops this push too
    pusher = None
    if not args.dry_run:
        pusher = HubPusher(HfApi(token=args.token), args.repo_id, "end", private=args.private)
        pusher.check_access()
    with tempfile.TemporaryDirectory() as export_dir:
        folder = export_llama(args.folder, Path(export_dir) / "llama")
        card = render_model_card(args.folder, args.repo_id, args.template, as_llama=True)
        card.save(folder / CARD_FILE)
        files = select_files(folder).files
        if pusher is None:
            print(f"Would push {len(files)} files of {args.folder} exported as LlamaForCausalLM to "
                  f"https://huggingface.co/{args.repo_id}:")
            print("\n".join(f"  {path}" for path in files))
            print(card_preview(card))
            return files
        pusher.push_final(folder, "Upload posvariants model as LlamaForCausalLM")
    print(f"Pushed {len(files)} files (LlamaForCausalLM) to https://huggingface.co/{args.repo_id}")
    return files


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # a refusal (secret-looking files, no token, …): the reason, not a traceback
        sys.exit(f"push_to_hub.py: {error}")
