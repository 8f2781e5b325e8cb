"""README.md's and docs/leaderboard.md's generated results sections, rewritten from the committed CSVs (running it
twice changes nothing).
"""

from __future__ import annotations

from pathlib import Path

from ...commands.readme import end_marker, replace_section, start_marker
from . import compare, training_records
from .markdown import document, headline
from .tables import read_csv

DOCS_PAGE = "docs/leaderboard.md"  # the full section; README.md carries the short "headline" one


README_COMMAND = f"diffmas-eval leaderboard --readme {DOCS_PAGE}"


HEADLINE_COMMAND = "diffmas-eval leaderboard --readme README.md"


README_START = start_marker("leaderboard", README_COMMAND)


README_END = end_marker("leaderboard")
HEADLINE_START = start_marker("headline", HEADLINE_COMMAND)
HEADLINE_END = end_marker("headline")


def update_readme(readme: Path, rows: list[dict], charts_dir: str = "leaderboards/",
                  comparison_rows: list[dict] | None = None, training_rows: list[dict] | None = None) -> bool:
    """Regenerate every results section ``readme`` has markers for: ``leaderboard`` (the whole document, the
    docs page) and ``headline`` (README.md's short one); True if the file changed. A file with neither is an
    error that gives the markers to paste. ``comparison_rows``: ``compare.comparisons`` of the per-item scores."""
    text = Path(readme).read_text()
    changed = False
    if "<!-- headline:start" in text:
        changed |= replace_section(readme, "headline", headline(rows, charts_dir, comparison_rows, training_rows),
                                   HEADLINE_COMMAND)
    if "<!-- leaderboard:start" in text or "<!-- headline:start" not in text:
        changed |= replace_section(readme, "leaderboard", document(rows, charts_dir, comparison_rows, training_rows),
                                   README_COMMAND)
    return changed


def regenerate(readme: Path, output: Path) -> bool:
    """``update_readme`` from the committed files beside ``output`` alone (the CSV, the per-item scores, the
    adapters' record), so ``--readme`` needs no cell or adapter; the comparisons are recomputed from the items."""

    paired = compare.comparisons(compare.read_items(output.parent))
    return update_readme(Path(readme), read_csv(output), comparison_rows=paired,
                         training_rows=training_records.read(output.parent)[0])
