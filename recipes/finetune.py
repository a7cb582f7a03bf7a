"""Fine-tune a patched model for longer context.

    accelerate launch recipes/finetune.py recipes/configs/llama/yarn4_lora.yaml [key=value ...]
    python recipes/finetune.py recipes/configs/llama/tiny_yarn4_lora.yaml       # one CPU process

Thin on purpose: the engine is hf_posenc.train (tested, shipped); recipes are the YAML configs
(recipes/configs/<family>/*.yaml; the tiny_*.yaml ones run on CPU in seconds).
"""

import sys

from hf_posenc.train import main

if __name__ == "__main__":
    sys.exit(main())
