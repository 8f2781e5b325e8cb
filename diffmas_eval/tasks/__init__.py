"""lm-eval task YAMLs for the DiffMAS benchmarks (found by the plain ``lm_eval`` CLI via the plugin)."""
