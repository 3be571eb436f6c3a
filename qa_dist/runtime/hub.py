"""Offline first: whether the Hugging Face hub can be reached, asked once per process.

Without a network, transformers and datasets retry every file of a hub name for a minute or more
and print each retry, before the real error. So before a hub name is first looked up, qa-dist
probes the hub's endpoint once (a TCP connection, at most ``PROBE_SECONDS``); when it cannot be
reached, this process goes offline (the hub client's own offline switch, as ``HF_HUB_OFFLINE=1``
would set it): names in the local cache still load, and any other name fails at once, as one line
that says why. Only this process: the environment that launch lines and batch jobs inherit is left
as it was (a compute node may reach the hub where a login node does not). Behind an HTTP proxy the
probe cannot tell, so it is not made."""

from __future__ import annotations

import os
import socket
import sys
import threading
from urllib.parse import urlsplit

PROBE_SECONDS = 3.0
_reachable: bool | None = None


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_forced_offline = False


def hub_offline() -> bool:
    """The user asked for no network (any of ``OFFLINE_VARIABLES``), or the probe found none."""
    return _forced_offline or any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES
    )


def _probe(host: str, port: int, seconds: float) -> bool:
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            result.append(True)
        except OSError:
            result.append(False)

    # A thread, not the socket timeout alone: name resolution is not bounded by it.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(result and result[0])


def hub_reachable() -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``, default huggingface.co) accepts a connection;
    probed once per process, never when the user set offline mode."""
    global _reachable
    if hub_offline():
        return False
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return True  # through a proxy: only the hub client itself can tell
    if _reachable is None:
        url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        port = url.port or (443 if url.scheme == "https" else 80)
        _reachable = _probe(url.hostname or "huggingface.co", port, PROBE_SECONDS)
    return _reachable


def go_offline_unless_reachable() -> bool:
    """Before a hub name is looked up: offline mode for this process when the hub cannot be reached.
    True when the process is offline."""
    global _forced_offline
    if hub_offline():
        apply_offline()
        return True
    if hub_reachable():
        return False
    _forced_offline = True
    apply_offline()
    return True


def apply_offline() -> None:
    """Tell the hub client (and datasets, once imported: it keeps its own copy) that this process is
    offline; a no-op unless it is. transformers asks the hub client."""
    if not _forced_offline:
        return
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True


def unreachable_message(key: str, name: str) -> str:
    return (
        f"{key}: {name!r} is not in the local cache, and the hub is unreachable (or HF_HUB_OFFLINE is set): give a "
        "local path, or fetch it once where the hub can be reached (set HF_HUB_OFFLINE=1 to skip the hub entirely)"
    )
