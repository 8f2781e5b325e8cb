"""Ray's private parts that the package uses, checked on Ray 2.60.0 (``CHECKED``: >=2.60,<3).

A Ray for one machine alone listens on loopback only if Ray's single-machine mode is on: ``ray.init`` replaces
127.0.0.1 with the machine's interface address whenever ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` is true
(Linux's default; the environment variable ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is read once, at Ray's import),
and the node's address is given through ``ray.init``'s private ``_node_ip_address``. Ray offers neither publicly.

Imported only where Ray (the ``leaderboard`` extra) is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray._private import ray_constants
from ray._private.authentication import authentication_token_setup

LIBRARY = "ray"
CHECKED = ">=2.60,<3"


@contextmanager
def single_machine_mode() -> Iterator[None]:
    """Ray's single-machine mode for the duration: 127.0.0.1 stays 127.0.0.1 (its value is restored after)."""
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def init_on_loopback(**kwargs) -> None:
    """``ray.init(**kwargs)`` of a new Ray (``address="local"``: even where a ``ray start`` on this machine left its
    address file) on 127.0.0.1, in single-machine mode: nothing outside the machine can reach it."""
    with single_machine_mode():
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)


def use_cluster_token_auth() -> None:
    """Token authentication on for this driver where ``RAY_AUTH_MODE`` is unset and a token exists, as ``ray start
    --head`` decides it for the cluster (Ray 2.60: ``maybe_enable_token_auth_if_token_available``, private)."""
    authentication_token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def join_on_loopback(address: str, **kwargs) -> None:
    """``ray.init(address=...)`` of a head bound to 127.0.0.1, in single-machine mode: in cluster mode the driver
    would look for its own node at the machine's interface address, where nothing listens."""
    with single_machine_mode():
        ray.init(address=address, _node_ip_address="127.0.0.1", **kwargs)
