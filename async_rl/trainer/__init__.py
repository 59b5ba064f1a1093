"""Trainer backend (PyTorch, HF models, FSDP2 when launched with several ranks).

The package itself imports nothing: `async_rl.trainer.checkpoint` is read by light processes
(the orchestrator finds the resume point) that must not pay for torch; import the trainer
from `async_rl.trainer.trainer`.
"""
