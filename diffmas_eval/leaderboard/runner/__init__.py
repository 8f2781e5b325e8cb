"""Running it: one cell scored, one adapter trained, the vLLM server a run decodes on, where Ray places each job.
Reads ``grid`` for what to run; knows nothing of ``results``."""
