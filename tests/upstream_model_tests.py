"""transformers' own common model tests (`ModelTesterMixin` in `tests/test_modeling_common.py`), taken from the
source distribution of the installed transformers version: fetched with pip at test time into a cache folder
(`$HF_POSVARIANTS_UPSTREAM_TESTS`, by default ~/.cache/hf_posvariants/transformers-tests), never committed.

The source distribution ships `tests/*.py` but not the subpackages `test_modeling_common` imports its generation
and export mixins from; those two are provided empty here (with a note saying so). Their tests are not part of
the source distribution: tests/test_generation_modes.py and tests/test_export.py are ours instead.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

PACKAGE = "transformers_upstream_tests"
CACHE = Path(
    os.environ.get("HF_POSVARIANTS_UPSTREAM_TESTS", Path.home() / ".cache" / "hf_posvariants" / "transformers-tests")
)
# The modules test_modeling_common imports from subpackages the source distribution leaves out.
ABSENT_MODULES = {
    "generation/test_utils.py": "GenerationTesterMixin",
    "exporters/test_export.py": "ExportTesterMixin",
}


class UpstreamTestsUnavailable(RuntimeError):
    """The source distribution could not be fetched (offline, or pip failed): the tests are skipped with this."""


def fetch_sdist_tests(version: str, target: Path) -> None:
    """Download transformers==`version`'s source distribution and unpack its top-level `tests/*.py` as `target`."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   f"transformers=={version}", "-d", scratch]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = (getattr(error, "stderr", None) or str(error)).strip().splitlines()[-3:]
            raise UpstreamTestsUnavailable(
                f"`{' '.join(command[2:])}` failed, so transformers' own model tests cannot run: {' | '.join(output)}"
            ) from error
        (sdist,) = Path(scratch).glob("transformers-*.tar.gz")
        unpacked = Path(scratch) / PACKAGE
        unpacked.mkdir()
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                    (unpacked / parts[2]).write_bytes(archive.extractfile(member).read())
        if not (unpacked / "test_modeling_common.py").exists():
            raise UpstreamTestsUnavailable(f"{sdist.name} has no tests/test_modeling_common.py")
        (unpacked / "__init__.py").touch()
        for path, mixin in ABSENT_MODULES.items():
            module = unpacked / path
            module.parent.mkdir(exist_ok=True)
            (module.parent / "__init__.py").touch()
            module.write_text(
                f'"""Not in the source distribution of transformers {version}: {mixin} is empty here, its tests '
                f'are not run."""\n\n\nclass {mixin}:\n    pass\n'
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            unpacked.rename(target)
        except OSError:  # another process unpacked it first
            if not (target / "test_modeling_common.py").exists():
                shutil.move(str(unpacked), str(target))


def load_test_modeling_common(version: str = transformers.__version__) -> ModuleType:
    """transformers' `test_modeling_common` for `version`, fetched once into the cache."""
    root = CACHE / version
    if not (root / PACKAGE / "test_modeling_common.py").exists():
        fetch_sdist_tests(version, root / PACKAGE)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
