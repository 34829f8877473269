"""jaxserve: a JAX/XLA inference runtime for large language models."""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import jaxserve` light: jax loads on first use of the API
    if name == "LLM":
        from jaxserve.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from jaxserve.engine.request import SamplingParams
        return SamplingParams
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
