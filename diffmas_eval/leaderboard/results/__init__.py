"""What it shows: results files made anywhere collected into rows, paired statistics and comparisons, the CSVs,
Markdown, charts and the generated doc sections. A function of the files alone: reads ``grid`` for paths and
metrics; never runs anything, so it knows nothing of ``runner``."""
