"""Joining or starting Ray, one way for every command of the package."""

from __future__ import annotations

import os
from typing import Any

import ray

from splitbits.runtime.errors import SplitbitsError


class ClusterError(SplitbitsError):
    """Ray could not be started or joined."""


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` ("auto", HOST:PORT), else start Ray in this process (with
    ``num_cpus``, default all); True if this call connected (so the caller disconnects). Already
    connected (a test, a notebook): that Ray is used as it is."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = ""
        if address and os.environ.get("RAY_AUTH_MODE") != "token":
            hint = (" (clusters started with `ray start` since Ray 2.59 require its token: set RAY_AUTH_MODE=token "
                    "here, with the head's token in RAY_AUTH_TOKEN or ~/.ray/auth_token)")
        raise ClusterError(f"cannot {'join Ray at ' + address if address else 'start Ray'}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}{hint}") from exc
    return True
