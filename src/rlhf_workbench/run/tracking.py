"""Experiment tracking through accelerate's trackers (TensorBoard, Weights & Biases, trackio, ...).

The loop logs every round's metrics under the names the database stores (``train/...``,
``eval/...``, ``time/...``) with ``step = round`` (version 0's evaluation at step 0), once the
round's policy version is published. ``tracking.backend`` in the run config picks the tracker:

    tracking:
      backend: tensorboard      # auto (default) | tensorboard | wandb | trackio | none | any accelerate tracker name
      dir: runs/demo/tensorboard  # TensorBoard's folder (default <out>/tensorboard)
      project: demo              # W&B / trackio project (default: the run directory's name)

``auto`` is TensorBoard when the ``tensorboard`` package is installed (a dependency of this
project), else nothing. View with ``tensorboard --logdir runs/demo/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_workbench.config import RunConfig


def _flat(config: dict, prefix: str = "") -> dict:
    """The nested run config as ``{"a/b": scalar}`` (lists as text), as trackers' hparams want."""
    out: dict = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``tensorboard`` when it is installed, else ``none``; other names unchanged."""
    if backend != "auto":
        return backend
    from accelerate.utils import is_tensorboard_available

    return "tensorboard" if is_tensorboard_available() else "none"


class Tracking:
    """The run's trackers (none, or one accelerate tracker); call on the main process only.

    Args:
        cfg: the run config (``cfg.tracking`` picks the tracker; the whole config is stored as the
            run's hyperparameters).
        out: the run directory (default TensorBoard folder ``<out>/tensorboard``, default project
            name).

    Raises:
        ValueError: an unknown tracker name, or a tracker whose package is not installed.
    """

    def __init__(self, cfg: RunConfig, out: Path):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.backend = resolve_backend(cfg.tracking.backend)
        self.tracker = None
        if self.backend == "none":
            return
        cls = LOGGER_TYPE_TO_CLASS.get(self.backend)
        if cls is None:
            raise ValueError(f"tracking.backend: unknown tracker {self.backend!r}; expected auto, none or one of "
                             f"{', '.join(LOGGER_TYPE_TO_CLASS)}")
        import accelerate.utils

        available = getattr(accelerate.utils, f"is_{self.backend}_available", lambda: True)
        if not available():
            raise ValueError(f"tracking.backend: {self.backend} is not installed (pip install {self.backend}), "
                             "or set tracking.backend: none")
        if cls.requires_logging_directory:
            self.dir = Path(cfg.tracking.dir) if cfg.tracking.dir else out / "tensorboard"
            self.tracker = cls("", self.dir)  # events directly in dir (accelerate joins dir / run name)
        else:
            self.dir = None
            self.tracker = cls(cfg.tracking.project or Path(out).resolve().name)
        self.tracker.start()
        self.tracker.store_init_configuration(_flat(cfg.model_dump(mode="json")))

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log one round's metrics (database names) at ``step`` = the round."""
        if self.tracker is not None:
            self.tracker.log({k: float(v) for k, v in metrics.items()}, step=step)

    def finish(self) -> None:
        """Flush and close the tracker (safe to call twice)."""
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
