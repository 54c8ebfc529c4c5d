"""Checkpoint loaders: a GGUF file or an HF directory -> (ModelConfig, param tree), optionally cached."""

from pathlib import Path

from models import checkpoint
from models.config import ModelConfig
from models.loaders.gguf import load_gguf
from models.loaders.hf import load_hf

__all__ = ["load_gguf", "load_hf", "load_model"]


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
    if path.is_file() and path.suffix == ".gguf":
        loader = load_gguf
    elif path.is_dir():
        loader = load_hf
    elif not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    else:
        raise ValueError(f"checkpoint {path} is neither a .gguf file nor an HF checkpoint directory")
    if cache_dir is None:
        return loader(path, dtype)
    key = checkpoint.source_key(path, dtype)
    cached = checkpoint.restore_cached(cache_dir, key)
    if cached is not None:
        return cached
    cfg, params = loader(path, dtype)
    checkpoint.save_cached(cache_dir, key, cfg, params)
    return cfg, params
