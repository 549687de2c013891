"""Evaluation: the loop's held-out evaluation (``heldout``), choosing the models and questions of
``rlhf eval`` / ``rlhf compare`` (``selection``), reward-model and LLM-judge scoring (``scoring``),
the ``rlhf eval`` report with confidence intervals (``report``) and the paired comparison of two
checkpoints (``compare``)."""
