#!/usr/bin/env bash
# Prepare the wheels that benchmarks/gpu_check.sh installs on a GPU machine without a package registry:
# flexlora's dependencies (and the test tools) except torch, which that machine already has.
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION, e.g. 3.11]   # -> benchmarks/wheels/ (git-ignored, about 40 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
python3 -m pip download -q --only-binary=:all: --python-version "$VERSION" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d benchmarks/wheels \
    "typer>=0.12" rich click shellingham "safetensors>=0.4" filelock "huggingface_hub>=0.24" hf-xet pyyaml tqdm packaging \
    fsspec requests urllib3 idna certifi charset-normalizer typing_extensions "peft>=0.13" "transformers>=4.45" tokenizers \
    regex accelerate psutil pytest pluggy iniconfig hypothesis sortedcontainers attrs markdown-it-py mdurl pygments
# torch and what comes with it are on the GPU machine already (and far too large to carry)
rm -f benchmarks/wheels/{torch,nvidia_*,triton,sympy,mpmath,networkx,jinja2,MarkupSafe,markupsafe,setuptools,numpy}-*.whl
du -sh benchmarks/wheels
