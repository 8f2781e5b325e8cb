"""Where this package reaches into another library's private parts: one small module per library.

Each module here names the library (``LIBRARY``) and the version range its shims were checked on (``CHECKED``, a
pip specifier equal to that library's requirement in ``pyproject.toml``: the lower bound is the version CI runs,
``constraints.txt``; the upper bound the next release that may change the private part). ``tests/test_compat.py``
imports each module, checks the installed version is in ``CHECKED`` and that every private name a shim reads is
still there and behaves as the shim expects: an upgrade that breaks one fails there, naming the library and shim.

- ``compat.lm_eval``: ``load_task_yaml`` (lm-eval's task YAML loader, ``lm_eval.tasks._yaml_loader``).
- ``compat.accelerate``: ``execution_device`` (the device an accelerate hook runs a module on, ``_hf_hook``).
- ``compat.ray``: ``init_on_loopback`` and ``single_machine_mode`` (Ray's single-machine mode,
  ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, and ``ray.init``'s ``_node_ip_address``).

These modules import nothing from ``diffmas_eval`` (the core, ``latent/`` included, may import them), and each
imports its library only where it is used: ``compat.ray`` is imported only where Ray (the ``leaderboard`` extra)
is needed.
"""
