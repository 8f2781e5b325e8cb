"""What to run: the methods, tasks and settings of a leaderboard and the hashes that key each cell, where each cell's
results live, what each trained method trains on, the ablations' grid, and ``--plan``'s estimates. Pure decisions:
nothing here starts a job, and nothing here imports ``runner`` or ``results``."""
