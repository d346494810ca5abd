#!/usr/bin/env bash
# transformers' contract (pytest -m contract) on the oldest transformers pyproject.toml allows, beside the newest
# that scripts/setup.sh installs: an upstream release that breaks the family then fails CI, not main silently.
#
# .venv-oldest holds only that transformers (pip --no-deps) and reads everything else from .venv through a .pth
# line, so it takes a minute to make and no second torch. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/^ *"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
[ -n "$oldest" ] || { echo "no transformers>=X.Y floor in pyproject.toml" >&2; exit 1; }
[ -x .venv-oldest/bin/python ] || .venv/bin/python -m venv .venv-oldest
base_site=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
oldest_site=$(.venv-oldest/bin/python -c 'import site; print(site.getsitepackages()[0])')
# After .venv-oldest's own packages on sys.path, so its transformers is the one imported.
echo "import site; site.addsitedir('$base_site')" > "$oldest_site/_hf_posvariants_base_venv.pth"
.venv-oldest/bin/python -m pip install --quiet --no-deps --ignore-installed "transformers==$oldest.*"
.venv-oldest/bin/python -c "import transformers; print('contract suite on transformers', transformers.__version__)"
.venv-oldest/bin/python -m pytest -m "contract and not slow" "$@"
