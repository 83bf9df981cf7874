"""Whether pretrained weights can be downloaded: probe the weight hub, recognise offline errors.

huggingface_hub retries a failed request for about a minute per file; probing the hub's host
first lets an offline machine fail in seconds with a line that says what to do.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from urllib.parse import urlparse

from camseg.errors import ConfigError

# Seconds to wait for the weight hub's host before calling the machine offline.
HUB_PROBE_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # an old or missing huggingface_hub: timm/smp then fail on their own
        return "https://huggingface.co"


def hub_reachable(url: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the weight hub's host answers a TCP connection within ``timeout`` seconds.

    huggingface_hub retries a failed request five times with back-off (about 50 s per
    file) before giving up; this probe lets an offline machine fail in seconds. Behind a
    proxy (or with ``HF_HUB_OFFLINE`` set, where only the cache is used) it says True and
    leaves the decision to the library.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    if urllib.request.getproxies():
        return True
    parsed = urlparse(url or hub_endpoint())
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_error(source: str, backbone: str, pretrained: bool | str, why: str) -> ConfigError:
    return ConfigError(
        f"model.net.pretrained={pretrained!r}: cannot download {source} weights for '{backbone}' ({why}); "
        "offline? set model.net.pretrained=false, or a local checkpoint path"
    )


def looks_offline(e: BaseException) -> bool:
    if isinstance(e, OSError):  # URLError, socket errors, huggingface_hub's cache misses
        return True
    text = f"{type(e).__name__} {e}".lower()
    return any(
        s in text
        for s in (
            "urlopen",
            "connection",
            "resolve",
            "network",
            "offline",
            "max retries",
            "timed out",
            "name or service",
            "localentrynotfound",
        )
    )
