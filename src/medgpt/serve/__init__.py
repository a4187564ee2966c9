"""Using a trained model: the generation engine and the surfaces built on it."""

from __future__ import annotations

import importlib.util
import ipaddress


def require_extra(extra: str, *modules: str) -> None:
    """Fail with the install command when an optional feature's packages are missing."""
    from medgpt.config import ConfigError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"this command needs {', '.join(missing)}: pip install 'medgpt[{extra}]'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, secret, remedy: str) -> None:
    """Refuse to listen beyond loopback without a secret: anyone on the network could use the model."""
    from medgpt.config import ConfigError

    if not secret and not is_loopback(host):
        raise ConfigError(f"listening on {host} makes the model reachable from the network: {remedy}, "
                         "or listen on 127.0.0.1")


def check_api_exposure(host: str, api_key: str | None) -> None:
    check_exposure(host, api_key, "set an API key (--api-key KEY or MEDGPT_API_KEY)")
