"""L2: the engine: scheduler (pure) + executor (real model or mocker) + models.

This module must not import torch: the mocker and router run without it.
"""
