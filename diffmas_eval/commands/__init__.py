"""The ``diffmas-eval`` commands (``cli``: flags only), the option reference they generate, and the two tools the
commands share: one parser for every ``KEY=VALUE,...`` flag (``options``) and generated README sections (``readme``)."""
