#!/usr/bin/env bash
# Pack this project's Python dependencies for an offline GPU machine whose image already holds torch,
# torchvision, numpy, pytest, pandas, pyarrow, scikit-learn... but not ray, mlflow or pydantic: one
# xz tarball of the missing packages, unpacked there into a folder put on PYTHONPATH.
#
#   bash bench/gpu_site.sh PRESENT.txt OUT.tar.xz [python-version, default 3.12]
#   # on the GPU machine:
#   mkdir -p /tmp/site && tar -xJf OUT.tar.xz -C /tmp/site && PYTHONPATH=/tmp/site make gpu-check
#
# PRESENT.txt: the target image's package names (`pip list --format=freeze | cut -d= -f1` there), any
# separators. Why a tarball and not wheels: ray's wheel alone is 77 MB, over a 64 MiB transfer limit;
# Ray's Java jars, RLlib, Serve, LLM and the dashboard's web build, and MLflow's web UI, are never
# imported by gmp-dist (Ray starts without its dashboard), so they are dropped: 42 MB packed, 247 MB
# unpacked, measured 2026-12-04 with ray 2.60.0 / mlflow 3.17.2 / pydantic 2.14.4.
set -euo pipefail
present=${1:?usage: gpu_site.sh PRESENT.txt OUT.tar.xz [python-version]}
out=${2:?usage: gpu_site.sh PRESENT.txt OUT.tar.xz [python-version]}
pyver=${3:-3.12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do platforms+=(--platform "${p}_x86_64"); done
pins=$(grep -oE '"(ray\[[a-z,]+\]|mlflow|pydantic)[^"]*"' pyproject.toml | tr -d '"' | tr '\n' ' ')
echo "resolving $pins for Python $pyver"
# shellcheck disable=SC2086
python3 -m pip download -q --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platforms[@]}" -d "$work/wheels" $pins
names=$(tr -s ' ,\n\t' '\n' <"$present" | tr 'A-Z_.' 'a-z--' | sort -u)
missing=()
for wheel in "$work"/wheels/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    # Tools ray[default] lists for runtime_env / profiling; gmp-dist never starts them.
    case $name in virtualenv|py-spy|docker|distlib|python-discovery|platformdirs) continue ;; esac
    grep -qx -- "$name" <<<"$names" || missing+=("$wheel")
done
echo "${#missing[@]} packages missing on the target: $(for w in "${missing[@]}"; do basename "$w" | cut -d- -f1; done | tr '\n' ' ')"
python3 -m pip install -q --no-deps --no-compile --target "$work/site" --python-version "$pyver" \
    --implementation cp "${platforms[@]}" --only-binary=:all: "${missing[@]}"
rm -rf "$work"/site/ray/{jars,rllib,llm,serve} "$work"/site/ray/dashboard/client/build \
    "$work"/site/mlflow/server/js/build "$work"/site/bin
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -T0 -9 >"$out"
echo "wrote $out: $(du -h "$out" | cut -f1) packed, $(du -sh "$work/site" | cut -f1) unpacked"
