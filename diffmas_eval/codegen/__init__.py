"""``diffmas-eval codegen``: HumanEval+ / MBPP+ samples from any lm-eval model, scored by EvalPlus.

- ``data``: which EvalPlus dataset file a run reads (offline overrides, ``--limit`` subsets).
- ``samples``: the resumable ``samples.jsonl`` / ``samples.raw.jsonl`` writer and the run's configuration.
- ``generate``: EvalPlus's prompts through the model's chat template, the model's own ``generate_until``.
- ``evaluate``: the ``evalplus.evaluate`` command, run as a subprocess, and its pass@1.
- ``cli``: ``run_codegen`` (the whole command as a typed function) and the argparse parser over it.
"""
