#!/usr/bin/env bash
# Install lazymoe on Python 3.12 and 3.13 (what Colab runs) and run the fast test subset on each.
#
# Not part of every CI run: there is no CPU torch for these Pythons on this machine's disk, so pip takes
# PyPI's CUDA build (torch 2.13.0: 2.7 GB of wheels, about 1.4 GB of it downloaded from PyPI, the rest from
# /opt/pypi-more; about 5 GB per virtualenv). Run it before a release and commit what it writes:
#
#   tools/pythons.sh [3.12 3.13]     # writes bench/results/pythons.md; venvs in .venv-py3.12 etc. (gitignored)
#
# Each Python comes from pyenv (~/.pyenv/versions/X.Y.*) or, failing that, from pythonX.Y on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[[ ${#versions[@]} -gt 0 ]] || versions=(3.12 3.13)
OUT=bench/results/pythons.md
FAST=(-m "not slow and not browser and not llama" -q -p no:cacheprovider)
rows=()
for v in "${versions[@]}"; do
    py=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python 2>/dev/null | sort -V | tail -1 || true)
    [[ -n "$py" ]] || py=$(command -v "python$v")
    venv=".venv-py$v"
    log="bench/.work/pythons-$v.log"
    mkdir -p bench/.work
    rm -rf "$venv"
    "$py" -m venv "$venv"
    vpy="$venv/bin/python"
    t0=$(date +%s)
    "$vpy" -m pip install -q --disable-pip-version-check torch==2.13.0 >"$log" 2>&1
    t1=$(date +%s)
    # the package as a user installs it (not editable), with the notebook extra, plus the test tools
    "$vpy" -m pip install -q --disable-pip-version-check ".[notebook]" "pytest>=8" "nbclient>=0.10" \
        "nbformat>=5.10" "ipykernel>=6.29" >>"$log" 2>&1
    t2=$(date +%s)
    venv_mb=$(du -sm "$venv" | cut -f1)
    # the installed copy imports from outside the checkout, templates included
    (cd /tmp && "$OLDPWD/$vpy" -c "import lazymoe.ui, lazymoe.card, lazymoe.cli; print(lazymoe.__file__)") >>"$log" 2>&1
    versions_line=$("$vpy" -c "import sys, torch, transformers, ipywidgets; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, ipywidgets {ipywidgets.__version__}')")
    set +e
    "$vpy" -m pytest "${FAST[@]}" >>"$log" 2>&1
    rc=$?
    set -e
    t3=$(date +%s)
    summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|(passed|failed).* in " "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    rows+=("| $v | $versions_line | $((t1 - t0)) s, $((t2 - t1)) s | ${venv_mb} MB | $summary (exit $rc) |")
    echo "${rows[-1]}"
done
{
    echo "# Python 3.12 / 3.13: install and fast tests"
    echo
    echo "Written by \`tools/pythons.sh\` on $(date -u +%Y-%m-%d) ($(uname -m), $(nproc) cores). Fast subset:"
    echo "\`pytest ${FAST[*]}\`. Install times: torch 2.13.0 from PyPI (CUDA build), then lazymoe[notebook] and the"
    echo "test tools; pip's cache was $( [[ -n "${PIP_NO_CACHE_DIR:-}" ]] && echo off || echo on)."
    echo
    echo "| Python | Versions | torch, then lazymoe install | venv size | fast tests |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} > "$OUT"
cat "$OUT"
