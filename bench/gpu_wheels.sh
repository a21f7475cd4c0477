#!/usr/bin/env bash
# Wheels for the lent GPU machines (Python 3.12, PyTorch preinstalled, nothing fetchable there): the packages
# bench/gpu_check.sh needs that their image lacks, downloaded here into .whl/ (kept out of git by .git/info/exclude)
# to travel with the working tree. There, before the check:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
#   bash bench/gpu_wheels.sh   (then: du -sh .whl; the working tree travels within 64 MiB)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# the server's and the benchmarks' dependencies missing from the GPU image (its package list: torch, numpy, pillow,
# httpx, prometheus-client, pytest, pyyaml are there)
PACKAGES=(av fastapi starlette uvicorn websockets pydantic pydantic-core pydantic-settings python-dotenv
          annotated-types typing-inspection)
# the versions this environment runs (the ones the tests passed with), else the latest
PYTHON=${PYTHON:-python3}
SPECS=()
for name in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) &&
        SPECS+=("$name==$version") || SPECS+=("$name")
done
rm -f .whl/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${SPECS[@]}"
ls .whl
du -sh .whl
