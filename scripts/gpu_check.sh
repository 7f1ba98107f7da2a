#!/usr/bin/env bash
# The prepared GPU check of issue 18: on one CUDA machine, in under 8 minutes, install what the
# machine lacks, then run scripts/gpu_check.py, which writes OUT/summary.md, OUT/summary.json and
# OUT/log.txt (named checks, pass/fail, figures).
#
#   bash scripts/gpu_check.sh OUT            run the checks (exits 0 with one line where no CUDA device exists)
#   bash scripts/gpu_check.sh --fetch DIR    download, on a machine that reaches the package registry, what a
#                                            machine without network needs (Python 3.12, x86-64) into DIR
#
# Python: $PYTHON, else python3 (it must hold torch built for CUDA). Packages missing there are
# installed into a virtual environment (made with --system-site-packages, so that torch, numpy and
# the rest come from the machine) from the registry, or without network from $ILLM_WHEELS
# (default: .whl in the repository, which `--fetch .whl` fills; keep it out of git). The project
# itself is installed with `pip install -e .`. Extra arguments after OUT go to gpu_check.py
# (e.g. --only codec_reference,coder_tables or --budget 300).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${ILLM_WHEELS:-$REPO/.whl}"
PYTHON="${PYTHON:-python3}"
# What the GPU image lacks among the project's dependencies (torch, accelerate, numpy, scipy,
# matplotlib, scikit-image, tensorboard, timm, ... are there). compressai 1.2.8 has no wheel for
# Python 3.12: its source is built there (pybind11 and a C++ compiler come with the image).
NEEDED=(compressai==1.2.8 lpips==0.1.4 pytorch-msssim==1.0.0 torch-fidelity==0.4.0 piq==0.8.0)

if [[ "${1:-}" == "--fetch" ]]; then
    dest="${2:?usage: gpu_check.sh --fetch DIR}"
    mkdir -p "$dest"
    platforms=()
    for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
        platforms+=(--platform "$tag")
    done
    for spec in "${NEEDED[@]}"; do
        if [[ "$spec" == compressai==* ]]; then
            "$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$dest" "$spec" || exit 1
        else
            "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp "${platforms[@]}" -d "$dest" "$spec" || exit 1
        fi
    done
    ls "$dest"
    exit 0
fi

OUT="${1:?usage: gpu_check.sh OUT [gpu_check.py options] | gpu_check.sh --fetch DIR}"
shift

skip() {
    mkdir -p "$OUT" && echo "gpu_check: skipped: $1" | tee "$OUT/summary.md"
    exit 0
}
cuda_in_torch() { "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU' && ! cuda_in_torch; then
    skip "no CUDA device on this machine (nvidia-smi lists no GPU, torch sees none)"
fi
if ! cuda_in_torch; then
    skip "$PYTHON has no torch that sees the CUDA device"
fi

mkdir -p "$OUT"
started=$SECONDS
VENV="${ILLM_GPU_VENV:-/tmp/illm-gpu-venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
    # $PYTHON may itself be a venv, whose packages --system-site-packages would not reach: the new
    # venv reads the interpreter's own site folders through a .pth file (after its own), and
    # runs that interpreter's pip.
    "$PYTHON" -m venv --without-pip "$VENV" || { echo "gpu_check: cannot make a venv at $VENV"; exit 1; }
    own_site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PYTHON" -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages()))' \
        >"$own_site/illm_gpu_check_parent.pth"
fi
PY="$VENV/bin/python"
missing=()
for spec in "${NEEDED[@]}"; do
    name="${spec%%==*}"
    module="${name//-/_}"
    [[ "$name" == pytorch-msssim ]] && module=pytorch_msssim
    "$PY" -c "import $module" 2>/dev/null || missing+=("$spec")
done
pip_install() {
    if [[ -d "$WHEELS" ]]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-build-isolation "$@"
    else
        "$PY" -m pip install -q --no-deps --no-build-isolation "$@"
    fi
}
if ((${#missing[@]})); then
    echo "gpu_check: installing ${missing[*]}"
    pip_install "${missing[@]}" || { echo "gpu_check: could not install ${missing[*]} (see --fetch)"; exit 1; }
fi
# no network and no build isolation: the machine's setuptools builds the editable install
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" \
    || { echo "gpu_check: pip install -e $REPO failed"; exit 1; }
echo "gpu_check: installed in $((SECONDS - started)) s; running the checks"

cd "$REPO" || exit 1
# the checks get what is left of 8 minutes, less a margin for writing the summary
budget=$((450 - (SECONDS - started)))
PYTHONUNBUFFERED=1 "$PY" scripts/gpu_check.py "$OUT" --device cuda --budget "$budget" "$@"
status=$?
echo "gpu_check: $((SECONDS - started)) s in all; summary in $OUT/summary.md"
exit $status
