"""Helper of tests/test_fault_matrix.py: ``rlhf worker`` that kills itself with SIGKILL at one stage.

    python tests/fault_worker.py STAGE LOG worker --config ... --out ...

The worker is the real loop (``rlhf_workbench.cli worker``) with canned rollouts, so a tiny random
model yields items worth ranking: per task ``K = 3`` traces, two verified-correct and one wrong
(``CannedEngine``; every call is appended to LOG as JSON). STAGE picks where the process dies,
as ``kill -9`` would, the first time it gets there in a round >= 1:

- ``rollout``: traces sampled, before the rollout is stored;
- ``consume``: rankings written inside the consumption transaction, before it commits;
- ``update``: before the policy update;
- ``checkpoint``: half-way through writing the checkpoint (weights in ``vN.tmp``, not renamed);
- ``publish``: checkpoint on disk, before the version is published;
- ``prune``: after publishing, before old checkpoints are pruned;
- ``none``: runs to the end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

STAGES = ("rollout", "consume", "update", "checkpoint", "publish", "prune")


def die() -> None:
    """What ``kill -9`` does: no cleanup, no finally blocks, no atexit."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    stage, log, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    assert stage in STAGES + ("none",), stage
    from rlhf_workbench.run import loop, setup
    from rlhf_workbench.cli import app
    from rlhf_workbench.model.rollout import Completion, render_prompt
    from rlhf_workbench.store import Store

    class CannedEngine:
        """Two verified traces and a wrong one per task, instead of sampling the tiny model."""

        def __init__(self, policy, tokenizer, *args, **kwargs):
            self.tok = tokenizer

        def generate(self, tasks, num_generations, *args, progress=None, **kwargs):
            comps = []
            for t in tasks:
                s = int(t.answer)
                texts = [f"Answer: {s}", f"{t.question}\nThat is {s}.\nAnswer: {s}", f"Answer: {s + 1}"]
                prompt = render_prompt(self.tok, t)
                for k, text in enumerate(texts[:num_generations]):
                    ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
                    comps.append(Completion(t.id, k, prompt, ids, [-1.0] * len(ids), text, True))
            with log.open("a") as f:
                f.write(json.dumps({"pid": os.getpid(), "generate": [t.id for t in tasks]}) + "\n")
            if stage == "rollout":
                die()
            return comps

        def sync_weights(self, policy) -> None:
            pass

    setup.HFEngine = CannedEngine

    def before(name: str, fn, when=lambda *a, **k: True):
        def wrapped(*a, **k):
            if stage == name and when(*a, **k):
                die()
            return fn(*a, **k)
        return wrapped

    real_record = loop._record_rankings

    def record_then_die(*a, **k):
        real_record(*a, **k)
        if stage == "consume" and k.get("session") is not None:
            die()  # rows flushed into the consumption transaction, never committed

    loop._record_rankings = record_then_die
    loop.grpo_update = before("update", loop.grpo_update)
    real_save = loop.save_policy

    def save_half_then_die(pair, out_dir, *a, **k):
        if stage == "checkpoint" and out_dir.parent.name == "checkpoints":
            pair.policy.save_pretrained(out_dir.with_name(out_dir.name + ".tmp"))  # weights, no tokenizer, no rename
            die()
        return real_save(pair, out_dir, *a, **k)

    loop.save_policy = save_half_then_die
    Store.publish_version = before("publish", Store.publish_version, lambda self, version, *a, **k: version >= 1)
    loop.prune_checkpoints = before("prune", loop.prune_checkpoints)
    app(args)


if __name__ == "__main__":
    main()
