"""Trainer backend (PyTorch, HF models, FSDP2 when launched with several ranks).

Importing this package pulls in torch; keep it out of light processes.
"""

from async_rl.trainer.batch import BatchError
from async_rl.trainer.checkpoint import latest_checkpoint
from async_rl.trainer.config import TrainerConfig
from async_rl.trainer.trainer import StepResult, Trainer, token_logprobs

__all__ = ["BatchError", "StepResult", "Trainer", "TrainerConfig", "latest_checkpoint", "token_logprobs"]
