"""The real tiny Llama checkpoint in ../shared/fixtures/base against its reference logits (fixtures/README.md)."""
import json

import jax.numpy as jnp
import numpy as np

from jaxq.io.hf_checkpoint import load_hf_params
from tests.shared_paths import FIXTURES, requires_fixtures

BASE = FIXTURES / "base"


@requires_fixtures
def test_base_fixture_matches_reference_logits():
    tolerance = json.loads((BASE / "tolerance.json").read_text())
    reference = np.load(BASE / "reference_logits.npz")
    # The reference is the bf16 checkpoint run in float32 (float32 inv_freq): load it into float32.
    family, config, params = load_hf_params(BASE, dtype=jnp.float32)
    assert family.name == "llama" and not config.tie_word_embeddings and "lm_head" in params
    logits, _ = family.module_class(config).apply({"params": params}, jnp.asarray(reference["input_ids"], jnp.int32))
    logits, ref = np.asarray(logits), reference["logits"]
    rel_err = np.linalg.norm(logits - ref) / np.linalg.norm(ref)
    top1 = (logits.argmax(-1) == ref.argmax(-1)).mean()
    assert rel_err < tolerance["rel_err"], rel_err
    assert top1 >= tolerance["top1"], top1
