"""What a training run is: its options (``TrainConfig``), the config as trained, and the
pure decisions made from them before any TensorFlow runs.

``resolve`` turns the options plus the shard directory into the config saved beside every
checkpoint; ``check_resume`` refuses a rerun that cannot continue a saved run exactly;
``lr_schedule`` fixes the learning-rate schedule, recorded with the config. No TensorFlow,
Ray or filesystem here: ``distill.train.run`` (the CLI and dispatch), ``distill.train.loop`` (the
loop) and ``workers.train_worker`` (Ray Train) all read it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from distill.errors import BadOption, IncompatibleRun
from distill.heartbeat import DEFAULT_EVERY as HEARTBEAT
from distill.heartbeat import check_every
from distill.options import option
from distill.train.centres import CENTRE_UPDATES
from distill.train.checkpoints import Cursor
from distill.train.losses import DISTILL_LOSSES, PAIR_FOCUSES, LossSpec
from distill.train.order import DEFAULT_PARTITIONS, check_partitions
from distill.train.student import ARCHS, DEFAULT_WIDTH, HEADS, MARGINS, StudentSpec

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
RECIPE = LossSpec()  # the default objective, stated once (in LossSpec)
# The working side a CPU run defaults to: at equal samples 112 px (the aligned faces' own side) is
# better, but 64 px trains 2.4x the samples per CPU minute (docs/QUALITY.md, "Resolution").
CPU_RESOLUTION = 64
SCHEDULES = ("cosine", "constant")
BACKBONE_WEIGHTS = ("imagenet",)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``distill train``; the CLI is derived from these fields (``distill.options``)."""

    shards: str = option(help="shard directory written by `distill embed` (RUN/shards)", positional=True, path=True, metavar="SHARDS")
    out: str = option(help="student directory (RUN/student): checkpoints, metrics.jsonl, tb/; a local path or an "
                           "object-store URI (s3://bucket/run/student: worked on in a local copy, pushed as it goes)",
                      required=True, path=True, metavar="DIR")
    # -- schedule
    epochs: int = option(20, "passes over the training rows", group="schedule")
    batch_size: int = option(64, "global batch, over all workers and replicas; each epoch drops the rows that do not fill one", group="schedule")
    lr: float = option(4e-3, "peak learning rate, for the global batch whatever the worker count (4e-3 beat 2e-3 "
                       "on people never trained on: docs/QUALITY.md)", group="schedule")
    optimizer: str = option("adam", "adam (AdamW when --weight-decay is set) or sgd (momentum 0.9, Nesterov)", choices=OPTIMIZERS, group="schedule")
    lr_schedule: str = option("cosine", "cosine decay to 1%% of --lr over the run, or constant", choices=SCHEDULES, group="schedule")
    warmup_steps: int = option(100, "linear warm-up from 1%% of --lr over this many steps (0: none)", group="schedule")
    weight_decay: float = option(0.0, "decoupled weight decay (BatchNorm, biases and class centres exempt)", group="schedule")
    ema: float = option(0.0, "keep an exponential moving average of the student's trainable weights at this decay "
                        "(e.g. 0.995: about the last 200 steps) and validate and export it instead of the last "
                        "weights (0: off)", group="schedule")
    max_steps: int | None = option(None, "stop after this many global steps (smoke runs, tests, a run in parts); the "
                                   "learning-rate schedule still spans --epochs, so a rerun with a larger value goes on", group="schedule")
    # -- objective
    distill_loss: str = option(RECIPE.distill, "distillation term: nmse (||s/|s| - t/|t|||^2 = 2 - 2 cos, the MSE of the "
                               "directions), cosine (1 - cos) or mse (raw values: dominated by the teacher's norm)",
                               choices=DISTILL_LOSSES, group="objective")
    distill_hardness: float = option(RECIPE.distill_hardness, "weigh each row's distillation term by that term to "
                                     "this power (>= 0), normalised to mean 1 over the global batch: the faces the student "
                                     "is furthest from its teacher on weigh most (0: every row alike)", group="objective")
    distill_quality: float = option(RECIPE.distill_quality, "weigh each row's distillation term by the teacher "
                                    "embedding's norm to this power (>= 0; the norm grows with face quality in "
                                    "margin-trained teachers), normalised to mean 1 over the global batch; with "
                                    "--distill-hardness, one weight of both (0: every row alike)", group="objective")
    distill_weight: float = option(RECIPE.distill_weight, "weight of the distillation term (--mse-weight: its old "
                                   "name)", group="objective", aliases=("mse_weight",))
    ce_weight: float = option(RECIPE.ce_weight, "weight of the identity classifier's cross-entropy", group="objective")
    contrast_weight: float = option(RECIPE.contrast_weight, "weight of contrastive distillation: each student embedding must pick its own "
                                    "teacher target out of the global batch's (InfoNCE on cosines; 0: off)", group="objective")
    contrast_temperature: float = option(RECIPE.contrast_temperature, "temperature of the contrastive term", group="objective")
    pair_weight: float = option(RECIPE.pair_weight, "weight of relational distillation on the hardest impostors: a student "
                                "embedding's cosines to the batch's other teacher targets fitted to the teacher's own, "
                                "weighted to the pairs the student (or, --pair-focus teacher, the teacher) finds most alike "
                                "(0: off, nMSE alone; with --pair-cap 0.1 it beat nMSE alone at 76k and 279k samples, "
                                "two seeds each; uncapped, one seed of two collapsed a group of faces: docs/QUALITY.md)",
                                group="objective")
    pair_temperature: float = option(RECIPE.pair_temperature, "temperature of the relational term's weights (lower: "
                                     "harder impostors only)", group="objective")
    pair_focus: str = option(RECIPE.pair_focus, "whose cosines pick the relational term's hard pairs: the student's "
                             "(its hardest impostors) or the teacher's (the pairs the teacher finds most alike)",
                             choices=PAIR_FOCUSES, group="objective")
    pair_cap: float = option(RECIPE.pair_cap, "cap each pair's weight in a row's relational term (the row's weights "
                             "sum to 1) at this share, not renormalised: at 0.1 no pair carries more than a tenth "
                             "of it, so a few faces the student has merged cannot take the whole term; at or below "
                             "1/(batch size - 1) every pair is capped and the term only shrinks (1: no cap)",
                             group="objective")
    margin: str = option(RECIPE.margin, "classifier: softmax, arcface (learned centres) or teacher (ArcFace whose "
                         "class centres are the teacher's, AdaDistill-style)", choices=MARGINS, group="objective")
    arc_scale: float = option(RECIPE.arc_scale, "ArcFace scale s (arcface and teacher margins)", group="objective")
    arc_margin: float = option(RECIPE.arc_margin, "ArcFace additive angular margin m, radians", group="objective")
    centre_update: str = option("adaptive", "teacher margin: centres fixed at the teacher's class means, or moved "
                                "each step by AdaDistill's rule", choices=CENTRE_UPDATES, group="objective")
    flip: bool = option(True, "random horizontal flip (towards the teacher's embedding_flip)", group="objective")
    view_prob: float = option(0.75, "when the shards hold views (`distill embed --views K`): chance that a sample "
                              "trains on one of its views instead of the plain image", group="objective")
    # -- student
    student: str = option("mobilefacenet", "backbone: mobilefacenet (the face recognition mobile net: stride 16, PReLU, "
                          "~1M parameters) or mobilenetv2 (Keras' MobileNetV2)", choices=ARCHS, group="student")
    width: float | None = option(None, "width multiplier (default: 0.5 for mobilenetv2, its alpha; 1.0 for mobilefacenet)", group="student")
    resolution: int | None = option(None, "the student's working resolution: it takes the shards' images (112x112) and "
                                    "resizes them inside the model to this side (a side not below the images': the images "
                                    f"as they are). Default: {CPU_RESOLUTION} on CPUs (2.4x the samples per minute of 112), the "
                                    "images' own side with --use-gpu (the better student per sample: docs/QUALITY.md)", group="student")
    head: str = option("gdc", "embedding head: global depthwise conv, or GAP+BN+Dropout+Dense", choices=HEADS, group="student")
    embedding_dim: int | None = option(None, "student embedding dim (default: the teacher's)", group="student")
    init: str | None = option(None, "start from these weights: a student dir, checkpoint or best/ dir (matching "
                              "variables by name), or a Keras MobileNetV2 weights file (.h5) for the backbone", metavar="PATH", group="student", path=True)
    backbone_weights: str | None = option(None, "start the backbone from Keras' ImageNet weights (downloads them)",
                                          choices=BACKBONE_WEIGHTS, group="student")
    # -- validation
    val_split: float = option(0.0, "hold out this fraction of the identities (seeded) and score the student on "
                              "them at every epoch end; the best epoch is kept in OUT/best", group="validation")
    val_folders: str | None = option(None, "or score on this identity folder tree of other people", metavar="DIR", group="validation", path=True)
    val_images: int = option(500, "images to validate on, at most", group="validation")
    val_seed: int = option(0, "seed of the held-out identities and of the validation images", group="validation")
    val_bin: str | None = option(None, "and/or insightface verification sets (lfw.bin,cfp_fp.bin,agedb_30.bin; "
                                 "comma-separated; paths or object-store URIs), scored as insightface does: 10-fold accuracy of the "
                                 "flip-summed embeddings, and ROC-AUC", metavar="FILE[,FILE...]", group="validation", path="list")
    val_every: int = option(0, "also validate every N steps (0: at epoch ends only; one emore epoch is thousands "
                            "of steps)", group="validation")
    best_by: str | None = option(None, "the figure that chooses OUT/best: 'held-out' (the ROC-AUC of --val-split / "
                                 "--val-folders) or a --val-bin set's name (lfw: its 10-fold accuracy); default: "
                                 "held-out when there is one, else the first set", group="validation")
    # -- data and checkpoints
    seed: int = option(0, "fixes the data order, flips, views and initial weights", group="data and checkpoints")
    shuffle_buffer: int = option(4096, "rows in the shuffle buffer, shared by the partitions (bounds memory)", group="data and checkpoints")
    partitions: int = option(DEFAULT_PARTITIONS, "canonical partitions of the epoch order: a run continues with any "
                             "worker count that divides it (fixed for a run; a worker holds a row group per partition it reads)", group="data and checkpoints")
    checkpoint_every: int = option(200, "steps between checkpoints (also at each epoch end)", group="data and checkpoints")
    keep_checkpoints: int = option(3, "checkpoints kept (plus the best, with validation)", group="data and checkpoints")
    verify_shards: bool = option(True, "before training, check every shard's size and sha256 against the manifest "
                                 "(each file is read once; OUT/shards-verified.json remembers what was)", group="data and checkpoints")
    # -- where it runs
    workers: int = option(1, "Ray Train workers (1: train in this process)", group="where it runs")
    use_gpu: bool = option(False, "train on GPUs (all local ones, or one per Ray worker)", group="where it runs")
    address: str | None = option(None, "Ray cluster address for --workers > 1 (default: RAY_ADDRESS when it is set, "
                                 "as `ray job submit` sets it; else start a local one)", group="where it runs")
    mixed_precision: bool = option(False, "float16 compute with loss scaling (GPUs only)", group="where it runs")
    run_name: str = option("train", "Ray Train run name (a rerun with the same name resumes)", group="where it runs")
    # -- logs
    log_every: int = option(10, "steps between metrics.jsonl records", group="logs")
    trace_samples: bool = option(False, "debugging aid: append each step's listing indices to OUT/trace.jsonl", group="logs")
    progress: bool | None = option(None, "progress bars (default: on a terminal only, so logs hold no bar frames)", group="logs")
    heartbeat: float = option(HEARTBEAT, "with the progress bars off (not a terminal, or --no-progress): log where "
                              "the run is (step, epoch, img/s, loss, cos, lr, ETA) every this many seconds; 0: never",
                              metavar="SECONDS", group="logs")

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "workers", "log_every",
                    "shuffle_buffer", "val_images")
        for name in positive:
            if getattr(self, name) <= 0:
                raise BadOption(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise BadOption(f"--lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise BadOption(f"--max-steps must be positive, got {self.max_steps}")
        check_every(self.heartbeat)
        for name in ("warmup_steps", "weight_decay", "seed", "val_seed"):
            if getattr(self, name) < 0:
                raise BadOption(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("resolution", "embedding_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BadOption(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.ema < 1:
            raise BadOption(f"--ema is a decay in [0, 1) (e.g. 0.995; 0: off), got {self.ema}")
        if self.optimizer not in OPTIMIZERS:
            raise BadOption(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise BadOption(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.centre_update not in CENTRE_UPDATES:
            raise BadOption(f"--centre-update must be one of {', '.join(CENTRE_UPDATES)}, got {self.centre_update!r}")
        if self.backbone_weights not in (None, *BACKBONE_WEIGHTS):
            raise BadOption(f"--backbone-weights must be imagenet, got {self.backbone_weights!r}")
        if self.student not in ARCHS:
            raise BadOption(f"--student must be one of {', '.join(ARCHS)}, got {self.student!r}")
        if self.width is not None and self.width <= 0:
            raise BadOption(f"--width must be positive (e.g. 0.35, 0.5, 1.0), got {self.width}")
        keras_file = self.backbone_weights or (self.init or "").endswith((".h5", ".hdf5", ".keras"))
        if keras_file and self.student != "mobilenetv2":
            raise BadOption("--backbone-weights and --init FILE.h5 load Keras' MobileNetV2 weights; with --student "
                            f"{self.student} start from scratch or --init an earlier {self.student} student")
        if self.init and self.backbone_weights:
            raise BadOption("pass --init PATH or --backbone-weights imagenet, not both")
        if not 0 <= self.view_prob <= 1:
            raise BadOption(f"--view-prob is a probability in [0, 1], got {self.view_prob}")
        if not 0 <= self.val_split < 1:
            raise BadOption(f"--val-split is a fraction of the identities in [0, 1), got {self.val_split}")
        if self.val_split and self.val_folders:
            raise BadOption("pass --val-split F (hold out identities of the shards) or --val-folders DIR, not both")
        if self.val_every < 0:
            raise BadOption(f"--val-every must be >= 0 (0: at epoch ends only), got {self.val_every}")
        if self.val_every and not self.validates:
            raise BadOption("--val-every needs something to validate on: --val-split, --val-folders or --val-bin")
        names = [name for name, _ in self.val_bins]
        if len(set(names)) < len(names):
            raise BadOption(f"--val-bin names its sets by file name, and two are called the same: {', '.join(names)}")
        _ = self.best_key  # (validates --best-by)
        if self.batch_size % self.workers:
            raise BadOption(f"--batch-size {self.batch_size} must be a multiple of --workers {self.workers}")
        check_partitions(self.partitions, self.workers)
        if self.mixed_precision and not self.use_gpu:
            raise BadOption(
                "--mixed-precision needs --use-gpu: float16 on a CPU is slower than float32, not faster. "
                "Drop --mixed-precision, or train on GPUs"
            )
        self.loss_spec()  # validates early

    def loss_spec(self) -> LossSpec:
        return LossSpec(
            ce_weight=self.ce_weight, distill_weight=self.distill_weight, distill=self.distill_loss, margin=self.margin,
            arc_scale=self.arc_scale, arc_margin=self.arc_margin, contrast_weight=self.contrast_weight,
            contrast_temperature=self.contrast_temperature, pair_weight=self.pair_weight,
            pair_temperature=self.pair_temperature, pair_focus=self.pair_focus, pair_cap=self.pair_cap,
            distill_hardness=self.distill_hardness, distill_quality=self.distill_quality)

    @property
    def validates(self) -> bool:
        return bool(self.val_split or self.val_folders or self.val_bin)

    @property
    def val_bins(self) -> tuple[tuple[str, str], ...]:
        """(name, path) of each --val-bin set: lfw.bin is "lfw"."""
        paths = [p.strip() for p in (self.val_bin or "").split(",") if p.strip()]
        return tuple((os.path.splitext(os.path.basename(p))[0], p) for p in paths)

    @property
    def best_key(self) -> str | None:
        """The metrics key that chooses OUT/best (None: nothing to validate on)."""
        held_out = bool(self.val_split or self.val_folders)
        names = [name for name, _ in self.val_bins]
        choice = self.best_by or ("held-out" if held_out else (names[0] if names else None))
        if choice is None:
            return None
        if choice == "held-out" and held_out:
            return "val_auc"
        if choice in names:
            return f"val_{choice}_acc"
        known = (["held-out"] if held_out else []) + names
        raise BadOption(f"--best-by {choice}: this run validates on {', '.join(known) or 'nothing'}; pass one of "
                        "those (a --val-bin set is named by its file name: lfw.bin is lfw)")


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


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule of a run (``lr_schedule``), recorded beside every checkpoint."""

    kind: str
    lr: float
    warmup_steps: int
    decay_steps: int | None
    train_rows: int


@dataclass(frozen=True)
class TrainRun:
    """A training run as resolved: the options, and what they and the shards fix (the student,
    the objective, the flips and views, the shards' run). Built once, by the driver (``resolve``),
    and shipped as it is to every Ray Train worker; saved beside every checkpoint (``config.json``, the
    ``to_json`` form) and compared with the saved one on resume (``check_resume``). The schedule
    is fixed once the training rows are known (``with_schedule``, after the held-out split)."""

    train: TrainConfig
    student: StudentSpec
    loss: LossSpec
    flip: bool
    view_prob: float
    shards_run_id: str
    teacher_norm: dict | None = None
    schedule: Schedule | None = None

    def with_schedule(self, train_rows: int) -> "TrainRun":
        return replace(self, schedule=lr_schedule(asdict(self.train), train_rows))

    def to_json(self) -> dict[str, Any]:
        d = {"train": asdict(self.train), "student": asdict(self.student), "loss": asdict(self.loss),
             "flip": self.flip, "view_prob": self.view_prob, "shards_run_id": self.shards_run_id,
             "teacher_norm": self.teacher_norm}
        if self.schedule is not None:
            d["schedule"] = asdict(self.schedule)
        from distill.startup import versions

        d["versions"] = versions()  # what it was trained with (informational: resume compares the rest)
        return json.loads(json.dumps(d))  # as saved: tuples become lists

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TrainRun":
        """A saved run (options this version no longer has are dropped; ones it added take their defaults)."""
        known = {f.name for f in fields(TrainConfig)}
        train = {"distill_weight" if k == "mse_weight" else k: v for k, v in d["train"].items()}  # (the old name)
        # Runs saved before --student and --resolution trained the student they saved, whatever today's defaults.
        train.setdefault("student", d["student"].get("arch", "mobilenetv2"))
        train.setdefault("resolution", d["student"].get("resolution") or max(d["student"]["input_size"]))
        return cls(
            train=TrainConfig(**{k: v for k, v in train.items() if k in known}),
            student=StudentSpec.from_json(d["student"]), loss=LossSpec.from_json(d["loss"]), flip=d["flip"],
            view_prob=d.get("view_prob", 0.0), shards_run_id=d["shards_run_id"], teacher_norm=d.get("teacher_norm"),
            schedule=Schedule(**d["schedule"]) if d.get("schedule") else None,
        )


def resolve(cfg: TrainConfig, shards) -> TrainRun:
    """The run as trained: the architecture, the objective, and what the shards fix. Pure."""
    from distill.train.stream import resolve_flip

    loss = unlabelled_loss(cfg, shards) if shards.num_classes == 0 else cfg.loss_spec()
    student = StudentSpec(
        input_size=shards.input_size,
        embedding_dim=cfg.embedding_dim or shards.embedding_dim,
        num_classes=shards.num_classes,
        width=cfg.width or DEFAULT_WIDTH[cfg.student], head=cfg.head, margin=loss.margin, arch=cfg.student,
        resolution=working_resolution(cfg.resolution or default_resolution(cfg.use_gpu), shards.input_size),
    )
    if student.embedding_dim != shards.embedding_dim and (loss.distils or loss.margin == "teacher"):
        why = "the teacher's class centres live" if loss.margin == "teacher" else "the distillation term compares them"
        raise BadOption(
            f"--embedding-dim {student.embedding_dim} differs from the teacher's {shards.embedding_dim}; {why} in "
            "the teacher's space, so the dims must be equal. Drop --embedding-dim"
        )
    if loss.margin == "teacher" and loss.ce_weight == 0:
        raise BadOption("--margin teacher is a classifier loss: give it a --ce-weight above 0")
    return TrainRun(
        train=cfg, student=student, loss=loss, flip=resolve_flip(shards, cfg.flip),
        view_prob=cfg.view_prob if shards.views is not None else 0.0, shards_run_id=shards.run_id,
        teacher_norm=shards.teacher_norm,
    )


def views_note(run: TrainRun) -> str | None:
    """What to say when --view-prob asks for views the shards do not hold (the default: none
    are stored), or None. Pure; ``distill train`` logs it once."""
    if run.train.view_prob <= 0 or run.view_prob > 0:
        return None
    return (f"the shards in {run.train.shards} hold no teacher views: training on the plain and mirrored images. That "
            "is the default: measured, views help on faces unlike the training faces (grey, older photos such as "
            "ORL's), not on faces like them; for such a deployment, `distill embed --views 4` (docs/QUALITY.md)")


def default_resolution(use_gpu: bool) -> int | None:
    """The working side when ``--resolution`` is not given: ``CPU_RESOLUTION`` on CPUs, where
    samples are what a minute buys least of; on GPUs, where samples are cheap, None (the images
    as they are), the better student per sample. Pure."""
    return None if use_gpu else CPU_RESOLUTION


def working_resolution(resolution: int | None, input_size: tuple[int, int]) -> int | None:
    """The student's working side: ``--resolution`` when it is below the images' side, else
    None (the images as they are: a smaller set, such as the demo's 64 px faces, is not scaled
    up). Pure."""
    return resolution if resolution and resolution < min(input_size) else None


def unlabelled_loss(cfg: TrainConfig, shards) -> LossSpec:
    """The objective when no row of the shards has an identity (label -1 throughout): the
    classifier terms have nothing to train on, so they are off, and the run says so. Pure."""
    loss = cfg.loss_spec()
    if not loss.ce_weight and loss.margin == "softmax":
        return loss
    if not loss.distils:
        raise BadOption(
            f"the shards in {shards.location} hold no labelled rows (every image is of no known identity), so the "
            "classifier (--ce-weight, --margin) has nothing to learn and it is the only term asked for; distil "
            "instead (--distill-weight, --contrast-weight, --pair-weight), or list identity folders with `distill listing`")
    log.warning("the shards in %s hold no labelled rows (every image is of no known identity): the classifier term "
                "is off, the student learns from the teacher's embeddings only", shards.location)
    return replace(loss, ce_weight=0.0, margin="softmax")


# Changing these mid-run would silently change the data order, the training rows or the graph.
_FIXED_TRAIN = ("batch_size", "seed", "shuffle_buffer", "partitions", "optimizer", "ema", "val_split", "val_seed")


def objective_changes(saved: dict[str, Any], run: TrainRun) -> list[str]:
    """The loss settings a resume changes from the saved run's (allowed: no order or graph
    depends on them; said, so that a changed default never passes silently). Pure."""
    wanted = run.to_json()["loss"]
    old = LossSpec.from_json(saved["loss"]).__dict__ if "loss" in saved else {}
    return [f"--{k.replace('_', '-')} {old[k]!r} -> {v!r}" for k, v in wanted.items() if k in old and old[k] != v]


def check_resume(saved: Mapping[str, Any], cursor: Cursor, run: TrainRun, where: str) -> None:
    """Refuse a resume that cannot continue the saved run (its ``config.json``) exactly, naming
    every difference. The saved run is read back as a ``TrainRun`` (what an older version did
    not record takes the default it trained with) and compared field by field. Pure."""
    was = TrainRun.from_json(saved)
    diffs = []
    if was.shards_run_id != run.shards_run_id:
        diffs.append(f"  shards: checkpoint trained on run {was.shards_run_id}, now {run.shards_run_id}")
    for k in _FIXED_TRAIN:
        if k == "partitions" and k not in saved["train"]:
            continue  # (an older run: below)
        if getattr(was.train, k) != getattr(run.train, k):
            diffs.append(f"  --{k.replace('_', '-')}: checkpoint has {getattr(was.train, k)!r}, now {getattr(run.train, k)!r}")
    for k in ("flip", "view_prob"):
        if getattr(was, k) != getattr(run, k):
            diffs.append(f"  {k.replace('_', '-')}: checkpoint has {getattr(was, k)}, now {getattr(run, k)}")
    for f in fields(StudentSpec):
        old, new = getattr(was.student, f.name), getattr(run.student, f.name)
        if old == new:
            continue
        if f.name == "resolution":  # (None: the images' own side; the default differs between CPUs and GPUs)
            side = {None: f"the images' own side ({max(run.student.input_size)})"}
            diffs.append(f"  --resolution: checkpoint has {side.get(old, old)}, now {side.get(new, new)}")
        else:
            diffs.append(f"  student {f.name}: checkpoint has {old!r}, now {new!r}")
    if was.schedule is not None:  # (runs saved before it was recorded have none)
        why = _schedule_diff(asdict(was.schedule), asdict(run.train))
        if why:
            diffs.append(why)
    if "partitions" not in saved["train"] and cursor.samples:
        # Before canonical partitions the epoch order depended on the worker count and the buffer's
        # reach; at an epoch boundary nothing is lost.
        diffs.append(f"  epoch order: the checkpoint is mid-epoch ({cursor.samples} samples into epoch {cursor.epoch}) "
                     "and was written by an older distill, whose epoch order this one does not follow")
    if diffs:
        raise IncompatibleRun(
            f"{where} holds a run this command cannot continue exactly:\n" + "\n".join(diffs)
            + "\nRerun with the original options (`distill train --resume OUT` takes them from the checkpoint; a run "
            "started before --lr defaulted to 4e-3 had 2e-3), or train into a new --out directory."
        )


def ema_warning(ema: float, steps: int) -> str | None:
    """What to say when ``--ema``'s average would still hold much of the first step's weights at
    the run's end (Keras starts it there and does not correct for it): over 1%. Pure."""
    if not ema or ema ** steps <= 0.01:
        return None
    window = max(10, round(0.2 * steps / 10) * 10)
    return (f"--ema {ema:g} over {steps} steps: the first step's weights still make up {ema ** steps:.0%} of the "
            f"average at the end; a decay of about {1 - 1 / window:.4g} averages the last ~{window} steps")


def lr_schedule(train: Mapping[str, Any], train_rows: int) -> Schedule:
    """The learning-rate schedule of a run, from its options (``asdict(TrainConfig)``) and its
    training rows: linear warm-up from 1% of ``lr``, then cosine to 1% over the planned run
    (the whole batches of ``epochs`` epochs), or constant. ``max_steps`` only stops the run
    early: it does not shape the schedule, so a run can be trained in parts. Recorded with the
    config beside every checkpoint, so a resume can tell whether its options would change the
    rate of the steps already taken. Pure."""
    total = max(1, train["epochs"] * (train_rows // train["batch_size"]))
    warmup = min(train["warmup_steps"], max(total - 1, 0))
    cosine = train["lr_schedule"] == "cosine"
    return Schedule(kind=train["lr_schedule"], lr=train["lr"], warmup_steps=warmup,
                    decay_steps=max(total - warmup, 1) if cosine else None, train_rows=train_rows)


def _schedule_diff(saved: Mapping[str, Any], wanted_train: Mapping[str, Any]) -> str | None:
    """Why the options would change the recorded schedule, or None when they do not."""
    now = asdict(lr_schedule(wanted_train, saved["train_rows"]))
    if now == dict(saved):
        return None
    def span(s):
        steps = f"{s['warmup_steps']} warm-up + {s['decay_steps']} cosine steps" if s["decay_steps"] else (
            f"{s['warmup_steps']} warm-up steps, then constant")
        return f"{s['kind']}, lr {s['lr']:g}, {steps}"
    return (f"  learning-rate schedule: checkpoint follows {span(saved)}; these options make it {span(now)}, "
            "which would change the rate of steps already taken (--epochs, --lr, --lr-schedule and --warmup-steps "
            "set it; --max-steps does not). To train on with a new schedule, start a new --out with --init OUT")


def should_checkpoint(step: int, every: int) -> bool:
    return step % every == 0
