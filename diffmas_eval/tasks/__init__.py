"""Data loading and scoring for the lm-eval tasks in the top-level ``tasks/`` folder (see ``utils``)."""
