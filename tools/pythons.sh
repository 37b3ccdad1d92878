#!/usr/bin/env bash
# Install lazymoe on Python 3.12 and 3.13 (what Colab runs) and run the fast test subset on each.
#
# Not part of every CI run: there is no CPU torch for these Pythons on this machine's disk, so pip takes
# PyPI's CUDA build (torch 2.13.0: 2.7 GB of wheels, about 1.4 GB of it downloaded from PyPI, the rest from
# /opt/pypi-more; about 5 GB per virtualenv). Run it before a release and commit what it writes:
#
#   tools/pythons.sh [3.12 3.13]     # writes bench/results/pythons.md; venvs in .venv-py3.12 etc. (gitignored)
#
# It installs and tests the committed HEAD (a `git archive` copy), so edits in the working tree during the
# run change nothing. Each Python comes from pyenv (~/.pyenv/versions/X.Y.*) or pythonX.Y on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[[ ${#versions[@]} -gt 0 ]] || versions=(3.12 3.13)
OUT=$PWD/bench/results/pythons.md
FAST=(-m "not slow and not browser and not llama" -q -p no:cacheprovider)
commit=$(git rev-parse --short HEAD)
snap=$(mktemp -d)
trap 'rm -rf "$snap"' EXIT
git archive HEAD | tar -x -C "$snap"
mkdir -p bench/.work
rows=()
for v in "${versions[@]}"; do
    py=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python 2>/dev/null | sort -V | tail -1 || true)
    [[ -n "$py" ]] || py=$(command -v "python$v")
    venv="$PWD/.venv-py$v"
    vpy="$venv/bin/python"
    log="$PWD/bench/.work/pythons-$v.log"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    t0=$(date +%s)
    "$vpy" -m pip install -q --disable-pip-version-check torch==2.13.0 >"$log" 2>&1
    t1=$(date +%s)
    echo "pythons.sh: torch installed in $((t1 - t0)) s" >>"$log"
    # the package as a user installs it (not editable), with its extras, plus the test tools: requirements.txt's
    # lines but torch (installed above) and the editable lazymoe
    mapfile -t tools < <(grep -vE '^\s*(#|$|-e |torch[=<> ])' "$snap/requirements.txt")
    "$vpy" -m pip install -q --disable-pip-version-check "$snap[notebook,plot]" "${tools[@]}" >>"$log" 2>&1
    t2=$(date +%s)
    echo "pythons.sh: lazymoe and the test tools installed in $((t2 - t1)) s" >>"$log"
    venv_mb=$(du -sm "$venv" | cut -f1)
    # the installed copy imports from outside the source tree, templates included
    (cd / && "$vpy" -c "import lazymoe.notebook.ui, lazymoe.publish.card, lazymoe.cli; print(lazymoe.__file__)") >>"$log" 2>&1
    versions_line=$("$vpy" -c "import sys, torch, transformers, ipywidgets; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, ipywidgets {ipywidgets.__version__}')")
    set +e
    (cd "$snap" && "$vpy" -m pytest "${FAST[@]}") >>"$log" 2>&1
    rc=$?
    set -e
    t3=$(date +%s)
    # the last summary line (a collection error has no "passed"): never a reason to stop before the row is written
    summary=$(grep -E "[0-9]+ (passed|failed|errors?).* in " "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//' || true)
    rows+=("| $v | $versions_line | $((t1 - t0)) s + $((t2 - t1)) s | ${venv_mb} MB | $summary, $((t3 - t2)) s (exit $rc) |")
    echo "${rows[-1]}"
done
{
    echo "# Python 3.12 / 3.13: install and fast tests"
    echo
    echo "Written by \`tools/pythons.sh\` on $(date -u +%Y-%m-%d) for commit $commit ($(uname -m), $(nproc) cores, load"
    echo "average $(cut -d' ' -f1-3 /proc/loadavg) at the end). Fast subset: \`pytest ${FAST[*]}\`, run in a"
    echo "\`git archive\` copy of that commit. Install: torch 2.13.0 from PyPI (the CUDA build), then lazymoe[notebook,plot]"
    echo "from the same copy (not editable) and the test tools. Logs: bench/.work/pythons-X.Y.log."
    echo
    echo "| Python | Versions | install: torch + lazymoe | venv size | fast tests |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} > "$OUT"
cat "$OUT"
