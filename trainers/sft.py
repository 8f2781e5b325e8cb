"""Supervised fine-tuning of a DiffMAS chain, in the style of TRL's example scripts.

    accelerate launch trainers/sft.py \
        --model_name_or_path Qwen/Qwen3-8B --dataset_name data/math_sft.jsonl \
        --use_peft --lora_r 8 --agents 4 --latent_steps 10 --output_dir out/

The trainer is ``diffmas_eval.training.sft`` (``accelerate launch -m diffmas_eval.training.sft``, or the
``diffmas-sft`` script, from an installed wheel); this file is the checkout's launcher over it, so every
option, its help and its default are defined there once (the DiffMAS ones in the chain's schema,
``diffmas_eval.latent.config``).
"""

from diffmas_eval.training.sft import DiffMASArguments, cli, main  # noqa: F401  (DiffMASArguments: re-exported)

if __name__ == "__main__":
    cli()
