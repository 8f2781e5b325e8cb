"""lm-evaluation-harness adapters. Kept import-light: ``plugin`` runs at every interpreter start."""
