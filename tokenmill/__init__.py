"""tokenmill: a distributed LLM inference server.

``from tokenmill import LLM, SamplingParams`` is the offline batch API. ``LLM`` is imported
lazily so that importing tokenmill (or its router, mocker or frontend) never loads torch.
"""

from tokenmill.core.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from tokenmill.engine.llm import LLM

        return LLM
    raise AttributeError(name)
