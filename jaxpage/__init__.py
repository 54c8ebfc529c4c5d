"""jaxpage: a JAX inference runtime for LLMs with a paged KV cache and continuous batching."""

from jaxpage.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in JAX and the model; loading it lazily keeps the host-only modules (page pool, scheduler)
    # importable without JAX.
    if name == "LLM":
        from jaxpage.llm import LLM

        return LLM
    raise AttributeError(f"module 'jaxpage' has no attribute {name!r}")
