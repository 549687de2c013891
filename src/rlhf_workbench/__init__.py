"""Online RLHF Workbench: sample, verify, rank and update a causal LM online.

The loop (see :mod:`rlhf_workbench.run.loop`): rollout -> verify -> feedback -> update
(DPO / GRPO) -> evaluate -> checkpoint, every step recorded in a SQL database.
"""

__version__ = "0.1.0"
