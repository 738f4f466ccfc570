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
