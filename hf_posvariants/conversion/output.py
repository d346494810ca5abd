"""Where a converter writes: the one check of an output folder and the one way of writing it, shared by every
converter and exporter (`export_llama`, `convert_llama_checkpoint`, `scripts/convert_deberta.py`,
`scripts/convert_diffllama.py`, the context extension's converted folders).

An output must be new or empty; `overwrite` replaces an earlier conversion (model files and the model code
`save_pretrained` copies beside them), never a folder holding anything else, never the source, and never the current
working directory or a folder holding it (the shell would be left in a deleted folder). The new folder is written
beside the output and renamed into place (`folder_written_whole`), so a killed conversion leaves no half folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..training.hub import MODEL_FILES, code_files, matches
from ..training.run_folder import folder_written_whole


def check_destination(source: str | Path | None, destination: str | Path, overwrite: bool,
                      field: str = "output") -> None:  # fmt: skip
    """Refuse, naming `field`, to write over the source (a local `source`; a Hub id is not checked), the current
    working directory, a folder holding files unless `overwrite`, and ever over one holding anything but an earlier
    conversion (a folder of the user's is never deleted)."""
    destination = Path(destination)
    if source is not None and Path(source).exists() and Path(source).resolve().is_relative_to(destination.resolve()):
        raise ValueError(f"{field}={str(destination)!r} is (or holds) the source folder {str(source)!r}: the "
                         f"conversion would replace the model it reads. Choose another {field} folder.")  # fmt: skip
    if Path.cwd().resolve().is_relative_to(destination.resolve()):
        raise ValueError(f"{field}={str(destination)!r} is (or holds) the current working directory "
                         f"{str(Path.cwd())!r}: it is never written in place. Choose another {field} folder, or run "
                         "from another directory.")  # fmt: skip
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"{field}={str(destination)!r} is a file, not a folder.")
    contents = sorted(destination.iterdir()) if destination.is_dir() else []
    allowed = MODEL_FILES + code_files(destination)
    foreign = [path.name for path in contents if not path.is_file() or not matches(path.name, allowed)]
    if foreign:
        raise ValueError(f"{field}={str(destination)!r} holds more than model files ({_listed(foreign)}): a "
                         "conversion never replaces it. Choose an empty or new folder.")  # fmt: skip
    if contents and not overwrite:
        names = _listed([path.name for path in contents])
        raise ValueError(f"{field}={str(destination)!r} already holds a model ({names}); pass --overwrite "
                         "(overwrite=True) to replace it, or choose an empty or new folder.")  # fmt: skip


@contextmanager
def model_folder_written(source: str | Path | None, destination: str | Path, overwrite: bool,
                         field: str = "output") -> Iterator[Path]:  # fmt: skip
    """`check_destination`, then a folder to write the conversion into, which takes `destination`'s place whole
    once the block ends without an error."""
    check_destination(source, destination, overwrite, field)
    with folder_written_whole(destination) as partial:
        yield partial


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
