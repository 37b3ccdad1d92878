#!/usr/bin/env bash
# Build .venv-colab: a stand-in for Colab's preinstalled image, for the widgets-7 browser test
# (tests/test_colab_browser.py) and the setup-cell install test (tests/test_colab_setup.py).
#
# What Colab has and this copies: ipywidgets 7.7.1 with the widgets-7 front end (classic Notebook 6 and
# widgetsnbextension 3.6 speak the protocol Colab's renderer implements), a torch that the setup cell must
# never replace, and the libraries lazymoe needs (transformers, huggingface_hub, ...), which Colab
# preinstalls too. lazymoe itself is NOT installed: the setup cell does that. What differs: Python 3.11 and
# a CPU torch (2.13.0, the build this machine has on disk) instead of Colab's Python 3.12/3.13 and CUDA
# torch 2.11 (tools/pythons.sh covers 3.12/3.13). torchvision and torchaudio are only downloaded, into
# $VENV/extra-wheels: PyPI's builds are CUDA builds that cannot load beside a CPU torch, and transformers
# imports torchaudio whenever it is installed, so the setup-cell test installs them for its own run only.
#
#   tools/colab_env.sh [VENV]      # default .venv-colab; rebuilt only when this script changes
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-colab}
PYTHON=${PYTHON:-python}
STAMP="$VENV/.built-from"
want=$(sha256sum tools/colab_env.sh pyproject.toml | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "$VENV is up to date"; exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

# Colab's torch stand-in
"${pip[@]}" torch==2.13.0
"$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$VENV/extra-wheels" \
    torchvision==0.28.0 torchaudio==2.11.1
# the widgets-7 front end, as Colab runs it. widgetsnbextension 3.6.6, not the newest 3.6: with Notebook
# 6.5, 3.6.8 and 3.6.10 cannot create an Output model ("_deserialize_state is not a function"), so every
# Output widget stays blank; Colab's own renderer does not use this package
"${pip[@]}" "ipywidgets==7.7.1" "widgetsnbextension==3.6.6" "notebook<7" ipykernel
# its own kernelspec, naming this interpreter (not a bare "python" that PATH may resolve elsewhere)
"$VENV/bin/python" -m ipykernel install --sys-prefix >/dev/null
# lazymoe's dependencies as pyproject.toml lists them (Colab preinstalls these), torch excluded
deps=$("$VENV/bin/python" - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.replace(" ", "").startswith("torch")))
PY
)
mapfile -t deps <<<"$deps"
"${pip[@]}" "${deps[@]}" matplotlib  # Colab preinstalls matplotlib too
"$VENV/bin/python" -m pip uninstall -q -y lazymoe 2>/dev/null || true
echo "$want" > "$STAMP"
"$VENV/bin/python" -c "import ipywidgets, notebook, torch; print('ipywidgets', ipywidgets.__version__, '| notebook', notebook.__version__, '| torch', torch.__version__)"
