"""Gin front for the library's dataclasses, for `LLM.from_gin` and the scripts.

The library itself takes frozen dataclasses; this module is the one place that turns gin files and bindings
into them, so gin stays an edge concern. A gin file binds `EngineConfig.<field>` and, for a model with random
weights (tests, speed runs), `engine_setup.random_model = @ModelConfig()` with `ModelConfig.<field>` bindings.
"""

from typing import NamedTuple

import gin

from jaxpage.config import EngineConfig
from models.config import ModelConfig, RopeScaling

gin.external_configurable(EngineConfig, module="jaxpage")
gin.external_configurable(ModelConfig, module="models")
gin.external_configurable(RopeScaling, module="models")


class EngineSetup(NamedTuple):
    """What an engine is built from (the arguments of `LLMEngine`)."""

    engine: EngineConfig
    random_model: ModelConfig | None  # None: load `engine.model`
    random_weight_scale: float


@gin.configurable(module="jaxpage")
def engine_setup(
    engine: EngineConfig | None = None,
    random_model: ModelConfig | None = None,
    random_weight_scale: float = 1.0,
) -> EngineSetup:
    return EngineSetup(
        engine if engine is not None else gin_engine_config(), random_model, random_weight_scale
    )


def gin_engine_config() -> EngineConfig:
    # Through gin's wrapper, so `EngineConfig.<field>` bindings apply without an explicit `@EngineConfig()`.
    return gin.get_configurable(EngineConfig)()


def parse(gin_files: list[str], gin_bindings: list[str]) -> EngineSetup:
    """Reads gin files, then bindings (which win), and builds the engine's setup from them."""
    gin.clear_config()
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings))
    return engine_setup()


def operative_config() -> str:
    """Every parameter the last `parse` used, defaults included: what to write next to an output."""
    return gin.operative_config_str()
