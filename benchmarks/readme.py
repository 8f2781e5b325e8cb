"""Put generated tables (Markdown files a command printed) into a docs page between two markers.

``make performance`` runs each benchmark with its stdout saved as ``benchmarks/results/<script>.md`` and
then this, which replaces the text between ``<!-- performance:start -->`` and ``<!-- performance:end -->``
with those files in a fixed order; ``--section NAME`` fills ``<!-- NAME:start/end -->`` with every
``*.md`` of the folder instead (``make codegen-table``). Running it twice changes nothing; numbers in
the docs are never typed by hand.

    python benchmarks/readme.py docs/performance.md benchmarks/results
    python benchmarks/readme.py docs/evalplus.md leaderboards/codegen --section codegen
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffmas_eval.commands.readme import replace_section

ORDER = [("latency", "Latency at a fixed answer budget (`benchmarks/latency.py`)"),
         ("multiple_choice", "Multiple-choice scoring (`benchmarks/multiple_choice.py`)"),
         ("scaling", "Scaling with agents and latent steps (`benchmarks/scaling.py`)"),
         ("training", "Training (`benchmarks/training.py`)"),
         ("decode", "The decode loop against HF `generate`: host work per token, batching, long answers "
                    "(`benchmarks/decode.py`)"),
         ("decode_eos", "The decode loop stops when its batch is done: real end-of-sequence against HF `generate` "
                        "(`benchmarks/decode.py --only-eos`; forwards and tokens are counts, the seconds were timed "
                        "on a busy machine)"),
         ("decode_memory", "The decode loop's peak allocation at a 32k budget (`benchmarks/decode_memory.py`)"),
         ("stage1_memory", "Stage 1's peak memory (`benchmarks/stage1_memory.py`)"),
         ("trace_layout", "The left-aligned trace against the previous layout (`benchmarks/trace_layout.py`)"),
         ("vllm", "vLLM against in process (`benchmarks/vllm.py`)"),
         ("serve", "The leaderboard's generative cells served against in process (`benchmarks/serve.py`)"),
         ("precision", "Precision of the latent loop: bf16 / float16 against float32, float32 against float64 "
                       "(`benchmarks/precision.py`)")]


def section(results: Path, name: str = "performance") -> str:
    order = ORDER if name == "performance" else [(f.stem, None) for f in sorted(results.glob("*.md"))]
    parts = []
    for stem, title in order:
        path = results / f"{stem}.md"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(("Loading", "wrote "))]
            # a line right after a table would render as one more row of it: keep a blank line between them
            lines = [x for i, ln in enumerate(lines) for x in ([ln, ""] if ln.startswith("|") and i + 1 < len(lines)
                     and lines[i + 1].strip() and not lines[i + 1].startswith("|") else [ln])]
            parts.append((f"#### {title}\n\n" if title else "") + "\n".join(lines).strip() + "\n")
    return "\n".join(parts)


def main(readme: str = "docs/performance.md", results: str = "benchmarks/results", *opts: str) -> int:
    name = opts[1] if len(opts) == 2 and opts[0] == "--section" else "performance"
    try:
        changed = replace_section(Path(readme), name, section(Path(results), name))
    except ValueError as err:
        raise SystemExit(str(err)) from None
    print(f"{readme}: {name} section {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
