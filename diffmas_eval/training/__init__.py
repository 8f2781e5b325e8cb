"""Supervised fine-tuning through the whole agent chain (TRL ``SFTTrainer`` subclass, in ``trainer``)."""
