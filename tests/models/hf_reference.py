"""Tiny random transformers models saved as safetensors checkpoints: the float32 torch reference."""
import numpy as np
import torch


def save_random_hf_model(path, config_cls, model_cls, seed: int = 0, **config_kwargs):
    """Build model_cls(config_cls(**config_kwargs)) with a seed, perturb EVERY parameter (so zero-initialised
    biases and one/zero-initialised norms are non-trivial and a loader that drops one fails), save it to path
    as safetensors and return the eval-mode float32 torch model. Eager attention: the exact-math reference."""
    torch.manual_seed(seed)
    model = model_cls(config_cls(attn_implementation="eager", **config_kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(attention_mask))
    return out.logits.float().numpy()


def right_padded_batch(vocab_size: int, lengths: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, max(lengths)] int32 (pads = 0 after each row's length) and attention_mask [B, T] int32."""
    t = max(lengths)
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    tokens = np.random.RandomState(seed).randint(1, vocab_size, (len(lengths), t)).astype(np.int32)
    return tokens * mask, mask
