"""mkdocs hook: the charts the generated sections show live beside their CSVs (leaderboards/, leaderboards/ablations/), not in
docs/. Publish each chart at the same path under the site, so a page in docs/ links ``leaderboards/accuracy.png``
exactly as README.md does, and mkdocs --strict checks those links like any other."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ("leaderboards/*.png", "leaderboards/ablations/*.png")


def on_files(files, config):
    for pattern in CHARTS:
        for path in sorted(ROOT.glob(pattern)):
            rel = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(rel) is None:
                files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
