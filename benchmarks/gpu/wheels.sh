#!/usr/bin/env bash
# The wheels the device check needs that the device machine's image lacks or has at another version, for its
# Python 3.12 on manylinux x86_64, at this project's pinned versions (constraints.txt), into .whl/ (ignored by
# git). The device tool carries the working tree and .whl/ together, at most 64 MiB in all: this checks the sum.
#
# Why these: the image has torch 2.11 and transformers 5.17, and no bitsandbytes or PEFT of our versions.
# bitsandbytes (qlora), peft (training, qlora), transformers (our pin), and accelerate (split's hooks, auto_batch's
# probe; peft needs it; 0.4 MB). Not tokenizers: transformers 5.17 already requires >=0.23.1,<0.24, as 5.24 does.
# huggingface_hub: 5.24 requires >=1.31 where 5.17 allowed >=1.5,<2, and transformers checks it at import; our pin
# (2.4.0) needs httpx2 and a newer hf-xet that the image cannot be assumed to have, so the last 1.x (1.33.0, the
# httpx the image's 1.x already uses) is taken instead. The check itself never reaches the hub (no network).
#
#   bash benchmarks/gpu/wheels.sh            # then carry .whl/ and see benchmarks/gpu/README.md
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
pin() { grep -i "^$1==" constraints.txt | head -1; }
rm -rf .whl && mkdir -p .whl
specs=()
for name in bitsandbytes transformers peft accelerate; do
    spec=$(pin "$name")
    [ -n "$spec" ] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
    specs+=("$spec")
done
specs+=("huggingface_hub==1.33.0")
for spec in "${specs[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -l .whl
wheels=$(du -sb .whl | cut -f1)
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
total=$((wheels + tree))
echo "wheels $((wheels / 1024)) KiB + tracked tree $((tree / 1024)) KiB = $((total / 1024)) KiB (limit 65536 KiB)"
[ "$total" -lt $((64 * 1024 * 1024)) ] || { echo "over the 64 MiB carry limit" >&2; exit 1; }
