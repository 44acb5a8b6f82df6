#!/usr/bin/env bash
# The wheels jetson/device_check.sh installs on a lent CUDA machine (issue 14): CPython 3.12,
# manylinux x86_64, torch/torchvision/numba/onnxruntime already there (the device README's KINDS.md
# lists what is), nothing downloadable there. Run it HERE (it needs PyPI), right before the device call:
#
#   echo /.whl/ >> .git/info/exclude     # once: the wheels travel as a carried, ignored folder
#   jetson/device_wheels.sh .whl         # then run(command="bash jetson/device_check.sh .whl", carry=[".whl"])
#
# What it fetches: splitbits itself (built from this working tree, so rebuild after every change:
# device_check.sh refuses a stale one), compressai 1.2.8 (the version the trainer pins) and its one
# dependency the machine lacks (pytorch-msssim), constriction (the coder the Numba one is compared
# with). Total about 1 MiB; the carry limit is 64 MiB including the working tree.
# PYTHON (default python3) runs pip; the splitbits build uses an isolated build environment from PyPI.
# PY_VERSION (default 3.12) picks the target CPython (another one only to try the scripts elsewhere).
set -euo pipefail
OUT=${1:-.whl}
PY=${PYTHON:-python3}
PYV=${PY_VERSION:-3.12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEPS=(compressai==1.2.8 pytorch-msssim==1.0.0 constriction==0.5.0)
PLATFORMS=(manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

mkdir -p "$OUT"
rm -f "$OUT"/*.whl
# splitbits from a copy of the working tree (tracked + untracked-not-ignored files): the checkout gets
# no build/ or egg-info folder (an in-tree egg-info shadows an editable install's entry points)
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) \
    | tar -xf - -C "$SRC"
"$PY" -m pip wheel -q --no-deps -w "$OUT" "$SRC"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$OUT" "${DEPS[@]}"

total=0
echo "wheels in $OUT (for CPython $PYV, manylinux x86_64):"
for f in "$OUT"/*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    printf '  %-80s %9d B\n' "$(basename "$f")" "$size"
done
printf '  %-80s %9d B (%s MiB)\n' "total" "$total" "$(awk "BEGIN { printf \"%.2f\", $total / 1048576 }")"
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "error: over 60 MiB: with the working tree they would not fit the 64 MiB carry limit" >&2
    exit 1
fi
