"""The installed packages against requirements.txt's pins, checked before torch, transformers or trl load.

Standard library only: a wrong version must end in one clear message, not in an
ImportError deep inside trl.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Mapping, Optional, Sequence

from cli.errors import SetupError

PROJECT_DIR = Path(__file__).resolve().parents[1]  # finetuning/, beside the scripts
REQUIREMENTS_FILE = PROJECT_DIR / "requirements.txt"

# Packages whose version decides whether the scripts work at all. Each of these
# pairings was run; the rest of requirements.txt only keeps installs reproducible.
# trl 0.8.6 is the user's fixed choice; it passes `tokenizer=` to Trainer, which
# transformers 5 removed, and Gemma 3 needs transformers >= 4.50, so 4.57 (the
# last 4.x) is the newest transformers that runs it.
CHECKED_PACKAGES = (
    "trl",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "huggingface-hub",
    "safetensors",
    "rich",
    "bitsandbytes",
    "galore-torch",
)


def read_pins(requirements_file: Path = REQUIREMENTS_FILE) -> dict[str, str]:
    """The exact `name==version` pins of requirements.txt, names normalised."""
    pins = {}
    for line in requirements_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_versions(
    packages: Sequence[str] = CHECKED_PACKAGES,
    installed: Optional[Mapping[str, Optional[str]]] = None,
    pins: Optional[Mapping[str, str]] = None,
) -> None:
    """Stop with one message listing every package whose installed version is not the pinned one.

    `installed` maps a name to its version (None: not installed); it defaults to
    what importlib.metadata finds, and exists so tests can plant versions.
    """
    pins = read_pins() if pins is None else pins
    problems = []
    for name in packages:
        wanted = pins[normalise(name)]
        found = installed.get(name) if installed is not None else installed_version(name)
        if found != wanted:
            problems.append((name, found, wanted))
    if installed_version("torch") is None and installed is None:
        problems.append(("torch", None, ">=2.4 (Colab ships one; elsewhere see pytorch.org)"))
    if not problems:
        return
    lines = [
        f"  {name}: found {found or 'not installed'}, need {wanted}" for name, found, wanted in problems
    ]
    fix = " ".join(f"{name}=={wanted}" for name, _, wanted in problems if not wanted.startswith(">="))
    raise SetupError(
        "These packages do not match the versions this toolkit was tested with:\n"
        + "\n".join(lines)
        + f"\nFix: pip install -r {display_path(REQUIREMENTS_FILE)}"
        + (f"\n  (or just: pip install {fix})" if fix else "")
        + "\nThen restart the Python runtime (on Colab: Runtime > Restart session)."
    )


def exit_on_wrong_versions() -> None:
    """What each script runs before its heavy imports: a wrong version ends the process with the message."""
    try:
        check_versions()
    except SetupError as e:
        sys.exit(f"ERROR: {e}")


def environment_summary() -> str:
    versions = {name: installed_version(name) for name in ("torch", *CHECKED_PACKAGES)}
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v) + f", python {sys.version.split()[0]}"


def display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
