"""What a training run is: its options (``TrainConfig``), the config as trained, and the
pure decisions made from them before any TensorFlow runs.

``resolve`` turns the options plus the shard directory into the config saved beside every
checkpoint; ``check_resume`` refuses a rerun that cannot continue a saved run exactly;
``schedule_steps`` fixes how many steps the learning-rate schedule spans. No TensorFlow,
Ray or filesystem here: ``distill.train`` (the CLI and dispatch), ``distill.loop`` (the
loop) and ``workers.train_worker`` (Ray Train) all read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from distill.checkpoints import Cursor
from distill.losses import LossSpec
from distill.student import StudentSpec

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    shards: str
    out: str
    epochs: int = 1
    batch_size: int = 64  # global: the sum over all workers and replicas
    lr: float = 1e-3  # for the global batch, whatever the worker count
    optimizer: str = "adam"
    lr_schedule: str = "cosine"
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    distill_loss: str = "mse"
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False
    address: str | None = None
    width: float = 0.5
    head: str = "gdc"
    margin: str = "softmax"
    embedding_dim: int | None = None  # None: the teacher's
    shuffle_buffer: int = 4096
    flip: bool = True
    mixed_precision: bool = False
    max_steps: int | None = None
    log_every: int = 10
    trace_samples: bool = False
    run_name: str = "train"
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "workers", "log_every", "shuffle_buffer")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"--max-steps must be positive, got {self.max_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.batch_size % self.workers:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}")
        if self.mixed_precision and not self.use_gpu:
            raise ValueError(
                "--mixed-precision needs --use-gpu: float16 on a CPU is slower than float32, not faster. "
                "Drop --mixed-precision, or train on GPUs"
            )
        LossSpec(self.ce_weight, self.mse_weight, self.distill_loss, self.margin)  # validates early


@dataclass(frozen=True)
class TrainReport:
    out: str
    checkpoint: str
    steps: int
    epochs_done: int
    samples_trained: int  # by this invocation
    seconds: float
    images_per_sec: float
    final: dict[str, float]
    resumed_from_step: int | None


# ---------------------------------------------------------------- pure decisions


def resolve(cfg: TrainConfig, shards) -> dict[str, Any]:
    """The config as trained: the architecture, the objective, and what the shards fix. Pure."""
    from distill.stream import resolve_flip

    student = StudentSpec(
        input_size=shards.input_size,
        embedding_dim=cfg.embedding_dim or shards.embedding_dim,
        num_classes=shards.num_classes,
        width=cfg.width, head=cfg.head, margin=cfg.margin,
    )
    if student.embedding_dim != shards.embedding_dim and cfg.distill_loss == "mse" and cfg.mse_weight > 0:
        raise ValueError(
            f"--embedding-dim {student.embedding_dim} differs from the teacher's {shards.embedding_dim}; the "
            "MSE to the teacher needs equal dims. Drop --embedding-dim"
        )
    return {
        "train": asdict(cfg),
        "student": asdict(student),
        "loss": asdict(LossSpec(cfg.ce_weight, cfg.mse_weight, cfg.distill_loss, cfg.margin)),
        "flip": resolve_flip(shards, cfg.flip),
        "shards_run_id": shards.run_id,
    }


# Changing these mid-run would silently change the data order or the graph.
_FIXED_TRAIN = ("batch_size", "seed", "shuffle_buffer", "optimizer")


def check_resume(saved: dict[str, Any], cursor: Cursor, wanted: dict[str, Any], world_size: int, where: str) -> None:
    """Refuse a resume that cannot continue the saved run exactly, naming every difference. Pure."""
    wanted = json.loads(json.dumps(wanted))  # compare as saved: tuples become lists
    diffs = []
    if saved["shards_run_id"] != wanted["shards_run_id"]:
        diffs.append(f"  shards: checkpoint trained on run {saved['shards_run_id']}, now {wanted['shards_run_id']}")
    for k in _FIXED_TRAIN:
        if saved["train"][k] != wanted["train"][k]:
            diffs.append(f"  --{k.replace('_', '-')}: checkpoint has {saved['train'][k]!r}, now {wanted['train'][k]!r}")
    if saved["flip"] != wanted["flip"]:
        diffs.append(f"  flip: checkpoint has {saved['flip']}, now {wanted['flip']}")
    for k, v in saved["student"].items():
        if v != wanted["student"].get(k):
            diffs.append(f"  student {k}: checkpoint has {v!r}, now {wanted['student'][k]!r}")
    if cursor.world_size != world_size and cursor.samples:
        # The epoch's order depends on the world size; at an epoch boundary nothing is lost.
        diffs.append(
            f"  workers: checkpoint is mid-epoch ({cursor.samples} samples into epoch {cursor.epoch}) with "
            f"{cursor.world_size} workers, now {world_size}"
        )
    if diffs:
        raise ValueError(
            f"{where} holds a run this command cannot continue exactly:\n" + "\n".join(diffs)
            + "\nRerun with the original options, or train into a new --out directory."
        )


def schedule_steps(cfg: TrainConfig, total_rows: int) -> int:
    """Steps the learning-rate schedule spans: the planned run (dropped remainders included)."""
    planned = max(1, cfg.epochs * (total_rows // cfg.batch_size))
    return min(planned, cfg.max_steps) if cfg.max_steps else planned


def should_checkpoint(step: int, every: int) -> bool:
    return step % every == 0
