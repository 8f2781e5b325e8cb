"""Put the benchmark tables (``benchmarks/results/*.md``, what the scripts printed) into README.md.

``make performance`` runs each script with its stdout saved as ``benchmarks/results/<script>.md`` and
then this, which replaces the text between the two performance markers of README.md with those files
in a fixed order. Running it twice changes nothing; numbers in the README are never typed by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

START, END = "<!-- performance:start -->", "<!-- performance:end -->"
ORDER = [("latency", "Latency at a fixed answer budget (`benchmarks/latency.py`)"),
         ("multiple_choice", "Multiple-choice scoring (`benchmarks/multiple_choice.py`)"),
         ("scaling", "Scaling with agents and latent steps (`benchmarks/scaling.py`)"),
         ("training", "Training (`benchmarks/training.py`)"),
         ("trace_layout", "The left-aligned trace against the previous layout (`benchmarks/trace_layout.py`)")]


def section(results: Path) -> str:
    parts = []
    for name, title in ORDER:
        path = results / f"{name}.md"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(("Loading", "wrote "))]
            parts.append(f"#### {title}\n\n" + "\n".join(lines).strip() + "\n")
    return "\n".join(parts)


def main(readme: str = "README.md", results: str = "benchmarks/results") -> int:
    path = Path(readme)
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no performance markers; add {START} and {END} where the tables go")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{section(Path(results))}{END}{tail}"
    if new != text:
        path.write_text(new)
    print(f"{readme}: performance section {'updated' if new != text else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
