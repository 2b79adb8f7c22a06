"""The executor plug: turns a ``SchedulerOutput`` into sampled tokens.

``base`` holds the torch-free interface (the mocker implements it too); ``model_runner``,
``paged_attention`` and ``sampler`` are the real, torch-backed implementation. This package
``__init__`` must not import torch.
"""

from tokenmill.engine.executor.base import Executor, ExecutorOutput

__all__ = ["Executor", "ExecutorOutput"]
