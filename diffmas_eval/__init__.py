"""diffmas-eval: DiffMAS latent multi-agent systems for lm-eval, EvalPlus and TRL."""

__version__ = "0.1.0"

# The model every command, lm-eval model and leaderboard uses when none is named: the offline bundled
# SmolLM2 (``models.py``). Defined here, where importing it loads nothing else (the CLI parses flags
# before torch loads).
DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
