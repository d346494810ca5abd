"""Metrics shipped with the package as `evaluate` modules (evaluate.load of Hub metrics needs the network).

`evaluate.load(POSVAR_ACCURACY)` loads the local module offline.
"""

from pathlib import Path

POSVAR_ACCURACY = str(Path(__file__).parent / "posvar_accuracy")
