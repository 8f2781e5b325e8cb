"""diffmas-eval: DiffMAS latent multi-agent systems for lm-eval, EvalPlus and TRL."""

__version__ = "0.1.0"
