"""The functions this directory's YAMLs name with ``!function utils.<name>``.

lm-eval loads ``utils.py`` from beside each YAML file, so this module must sit here; the code
itself lives once, in the package (``diffmas_eval.tasks.utils``), where the trainer's SFT sets
and the tests import it too.
"""

from diffmas_eval.tasks.utils import (  # noqa: F401
    answers_letter,
    answers_math,
    answers_number,
    load_aime24,
    load_aime25,
    load_arc_challenge,
    load_commonsense_qa,
    load_gpqa_diamond,
    load_gsm8k,
    load_math500,
    process_letter,
    process_math,
    process_number,
)
