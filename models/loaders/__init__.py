"""Checkpoint loaders: a GGUF file or an HF directory -> (ModelConfig, param tree), optionally cached."""

from pathlib import Path

from models import checkpoint
from models.config import ModelConfig
from models.loaders.gguf import gguf_config, load_gguf, read_gguf
from models.loaders.hf import load_hf, read_hf_config

__all__ = ["load_gguf", "load_hf", "load_model", "read_model_config"]


def read_model_config(path: str | Path, dtype: str = "float32") -> ModelConfig:
    """The checkpoint's ModelConfig without its weights (config.json, or the GGUF header): what a caller
    checks before a load that may take minutes."""
    path = Path(path)
    if _is_gguf(path):
        metadata, tensors = read_gguf(path)  # the header only; tensor data stay in the mapped file
        return gguf_config(metadata, tensors, path, dtype)
    return read_hf_config(path, dtype)


def _is_gguf(path: Path) -> bool:
    """True for a .gguf file, False for a directory; a ValueError naming the path for anything else."""
    if path.is_file() and path.suffix == ".gguf":
        return True
    if path.is_dir():
        return False
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    raise ValueError(f"checkpoint {path} is neither a .gguf file nor an HF checkpoint directory")


def load_model(
    path: str | Path, dtype: str = "float32", cache_dir: str | Path | None = None
) -> tuple[ModelConfig, dict]:
    """Loads a `.gguf` file or an HF checkpoint directory.

    Args:
      path: a `.gguf` file, or a directory with config.json and model.safetensors (or a sharded index).
      dtype: "float32", "bfloat16" or "float16": the params' and the config's dtype.
      cache_dir: if given, converted params are kept there (orbax) and reused while the source is unchanged.

    Returns:
      (config, params): params is the nested dict of numpy arrays described in docs/architecture.md.
    """
    path = Path(path)
    loader = load_gguf if _is_gguf(path) else load_hf
    if cache_dir is None:
        return loader(path, dtype)
    key = checkpoint.source_key(path, dtype)
    cached = checkpoint.restore_cached(cache_dir, key)
    if cached is not None:
        return cached
    cfg, params = loader(path, dtype)
    checkpoint.save_cached(cache_dir, key, cfg, params)
    return cfg, params
