"""Where a model comes from: the hub (reachable or not, checked at once rather than after retries) and the token
for gated models (a Colab secret, handed on through the environment and never logged)."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub

from cli.errors import UserInputError

logger = logging.getLogger(__name__)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout_s: float = 3.0):
    """None where the hub answers a connection (or a proxy stands between, which a direct connect cannot judge);
    otherwise (its host, the error)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return host, e
    return None


# Where the Hugging Face libraries keep their downloads and caches (XDG_CACHE_HOME: under it, ~/.cache's stand-in).
CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE",
                   "XDG_CACHE_HOME")


def check_cache_variables() -> None:
    """A cache variable that points at a file (or into one) fails later as a download error or gated-model advice
    that names neither: name the variable and the path now."""
    for name in CACHE_VARIABLES:
        value = os.environ.get(name)
        if not value:
            continue
        path = Path(value).expanduser()
        existing = path.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            where = "a file" if existing == path.absolute() else f"inside the file {existing}"
            raise UserInputError(
                f"The environment variable {name} is {value}, which is {where}, not a folder: the Hugging Face "
                f"libraries keep their downloads and caches under it. Point {name} at a folder (export "
                f"{name}=/path/to/a/folder), or unset it (unset {name}) for the default."
            )


def check_hub_reachable(model_name_or_path: str) -> None:
    """A hub id that is neither cached here nor reachable fails at once, not after half a minute of retries."""
    # TRANSFORMERS_CACHE: a cache of its own, which the hub's cache lookup below does not see.
    if (Path(model_name_or_path).exists() or huggingface_hub.constants.HF_HUB_OFFLINE
            or os.environ.get("TRANSFORMERS_CACHE")):
        return
    try:
        if huggingface_hub.try_to_load_from_cache(model_name_or_path, "config.json") is not None:
            return
    except ValueError:  # not a valid hub id: from_pretrained says so itself
        return
    unreachable = hub_unreachable()
    if unreachable:
        host, error = unreachable
        raise UserInputError(
            f"--model_name_or_path {model_name_or_path!r} is a hub id, and {host} cannot be reached from this machine "
            f"({error}). Check the network, or point --model_name_or_path at a local folder. To check your data and "
            "the whole pipeline offline, add --smoke (with --dry_run: the data and the batches only)."
        ) from error


def use_colab_token() -> None:
    """On Colab, hand a secret named HF_TOKEN to huggingface_hub through the environment; never log it."""
    if os.environ.get("HF_TOKEN"):
        return
    try:
        from google.colab import userdata
    except ImportError:
        return
    try:
        token = userdata.get("HF_TOKEN")
    except (userdata.SecretNotFoundError, userdata.NotebookAccessError):
        logger.info("No Colab secret HF_TOKEN (or no access to it): gated models such as Gemma will not load.")
        return
    os.environ["HF_TOKEN"] = token
    logger.info("Using the Colab secret HF_TOKEN for the Hugging Face hub.")
