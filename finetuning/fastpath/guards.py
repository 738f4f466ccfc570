"""The checks every override makes before it installs: its target imported, the version it was written for, the
names it touches. A check that fails logs one line and the override leaves the stock path in place."""
from __future__ import annotations

import logging
from typing import Iterable

from cli.versions import installed_version

logger = logging.getLogger(__name__)

# The versions the overrides were written and tested against (version prefixes).
TESTED = {"transformers": "4.57.", "peft": "0.21.", "bitsandbytes": "0.50.", "galore-torch": "1.0", "trl": "0.8.6"}


def version_ok(package: str, what: str) -> bool:
    found = installed_version(package)
    if found is not None and found.startswith(TESTED[package]):
        return True
    logger.warning("%s: written for %s %s*, found %s; using the stock path.", what, package, TESTED[package], found)
    return False


def found(target, name: str, what: str) -> bool:
    if target is None:
        logger.warning("%s: %s could not be imported; using the stock path.", what, name)
    return target is not None


def has(target, names: Iterable[str], what: str) -> bool:
    missing = [name for name in names if not hasattr(target, name)]
    if missing:
        logger.warning("%s: %s has no %s; using the stock path.", what, getattr(target, "__name__", target), missing)
    return not missing
