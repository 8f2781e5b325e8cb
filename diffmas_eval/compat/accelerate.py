"""accelerate's private parts that the package uses, checked on accelerate 1.16.0 (``CHECKED``: >=1.16,<2).

``execution_device``: where accelerate runs a module of a model dispatched with a ``device_map`` (its
``AlignDevicesHook.execution_device``; offloaded weights sit elsewhere). accelerate attaches that hook as the
module's ``_hf_hook`` (``accelerate.hooks.add_hook_to_module``) and has no public getter for it; the model's
``hf_device_map`` says where weights are, not where an offloaded layer runs.

Imports nothing (not even accelerate): the chain's core (``latent/``) reads it on any model.
"""

from __future__ import annotations

LIBRARY = "accelerate"
CHECKED = ">=1.16,<2"


def execution_device(module):
    """The execution device of the accelerate hook on ``module`` (a device, a string or a CUDA index), or None
    when accelerate put no device-aligning hook on it."""
    return getattr(getattr(module, "_hf_hook", None), "execution_device", None)
