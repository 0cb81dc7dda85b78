"""The Ray instance a command starts on this machine when it joins no cluster.

Ray 2.60's `ray.init()` of a new local cluster turns token authentication on and, unless a
token is already configured, writes one to `~/.ray/auth_token` (`ensure_token_if_auth_enabled`
in `ray/_private/authentication/authentication_token_setup.py`). That file outlives the run:
every later `ray start --head` on the account finds it and turns token auth on too
(`maybe_enable_token_auth_if_token_available`), while `ray job submit` sends the token only
when `RAY_AUTH_MODE=token` is set, so the README's local-cluster commands fail with
`AuthenticationError`. Here the local instance gets a token of its own, for this process and
the Ray processes it starts only: token auth stays on, and nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

import ray

# Set by the user (or by `ray job submit` / a cluster's nodes): Ray's own choice stands.
AUTH_SETTINGS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def start_local_ray(**init_kwargs: Any) -> None:
    """`ray.init(address="local", **init_kwargs)` with a token for this instance only.

    The token goes into this process's environment before the instance starts, so its GCS,
    raylet and workers inherit it; `~/.ray` is not touched."""
    if not any(name in os.environ for name in AUTH_SETTINGS):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        # Ray then says on every run that token auth is on and how to opt out: true of this
        # instance, and nothing for a user to act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
    ray.init(address="local", **init_kwargs)
