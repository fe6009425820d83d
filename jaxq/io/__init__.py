"""Checkpoint readers and writers (see design.md, "Packages"); `embedded_model_path` fetches the embedded models."""

from jaxq.io.model_cache import embedded_model_path

__all__ = ["embedded_model_path"]
