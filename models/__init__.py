"""Flax model definitions, one module per family, built from jaxq.nn blocks."""
