"""Imported first by each script, before torch, transformers or trl: a wrong library version ends the process with one
clear message (not an ImportError from deep inside a library), and library noise is silenced before bitsandbytes
loads (it warns at import)."""
from cli import noise, versions

versions.exit_on_wrong_versions()
noise.silence()
