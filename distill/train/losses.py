"""The training objective, as named parts: ``distill``, ``contrast``, ``pair``, ``ce``, ``loss`` (and ``cos``, logged).

``loss = distill_weight * distill + contrast_weight * contrast + pair_weight * pair + ce_weight * ce``;
a part whose weight is 0 is neither computed nor logged.

- ``ce`` is softmax cross-entropy of the classifier head. With ``margin`` ``arcface`` or
  ``teacher`` the logits are cosines and get the ArcFace additive angular margin and scale
  here; ``teacher`` means the class centres are the teacher's (``distill.train.centres``).
- ``distill`` is the distillation term, by ``LossSpec.distill``:
  ``mse``    mean squared error per dimension of the raw embeddings (dominated by the teacher's
             norm: mobilefacenet's raw norm is ~70, so this term is ~24 at the start);
  ``nmse``   squared distance of the L2-normalised embeddings, ``2 - 2 cos``: MSE on the
             direction, the only thing verification uses, and independent of either norm;
  ``cosine`` ``1 - cos``, the same direction term at half the scale.
  The teacher side is a constant: gradients reach the student only. ``distill_hardness`` H > 0
  weighs each row's term ``d_i`` by ``d_i^H / mean_j(d_j^H)`` over the global batch (no gradient
  through the weights; their mean is 1, so the learning rate means the same): the faces the
  student is furthest from its teacher on weigh most, where the mean lets the many easy rows set
  the step. ``distill_quality`` Q > 0 weighs it by the teacher embedding's norm ``|t_i|^Q`` the
  same way: in margin-trained teachers the norm grows with how clearly the face shows who it is
  (MagFace), so clear faces weigh most and blurred or turned ones least. Both on: one weight,
  ``d_i^H |t_i|^Q`` over its batch mean. A teacher whose embeddings are unit-length has no norm
  to give: Q then changes nothing.
- ``contrast`` is contrastive distillation (InfoNCE over the teacher's embeddings, as in CRD):
  each student embedding must pick its own teacher target out of every target of the global
  batch, ``-log softmax_j(cos(s_i, t_j) / T)[i]``. The other targets are mostly *other images
  of the same people*: where ``distill`` is met by knowing who a face is (a few identity directions
  carry most of the targets' variance), this term needs what tells two photos of one person
  apart in the teacher's space, which is what carries over to people the student never saw.
  Every replica gathers the whole global batch's targets, so the term is the same for any
  number of workers.
- ``pair`` is relational distillation aimed at the impostor tail: the cosines of a student
  embedding to the *other* teacher targets of the global batch, fitted to the teacher's own
  cosines between those images, ``sum_j w_ij (cos(s_i, t_j) - cos(t_i, t_j))^2``. The weights
  ``w_ij = softmax_j(cos(s_i, t_j) / T)`` (no gradient; ``j != i``) put the term on the pairs the
  student finds most alike: the impostors that decide TAR at a low FAR. Unlike ``contrast`` it
  pushes no pair apart that the teacher holds together (two photos of one person stay close).
  ``pair_focus`` ``teacher`` takes the weights from the teacher's cosines ``cos(t_i, t_j)``
  instead: the pairs the teacher finds most alike, fixed by the data, so the weights cannot
  follow the student onto a group of faces it has merged. ``pair_cap`` C < 1 caps each weight
  at C (``min(w_ij, C)``, not renormalised): no single pair carries more than C of a row's term,
  so a few pairs the student has merged cannot take the whole of it.
- ``cos`` is the batch's mean teacher-student cosine, whatever the loss: the number to watch.

Parts are averaged over the *global* batch (``tf.nn.compute_average_loss``): summed across
replicas they are the plain batch mean, so the learning rate means the same thing whatever
the number of workers. Hands on: the dict that ``train`` logs as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distill.errors import BadOption

DISTILL_LOSSES = ("mse", "nmse", "cosine")
PAIR_FOCUSES = ("student", "teacher")  # whose cosines weight the relational term's pairs
COSINE_MARGINS = ("arcface", "teacher")  # heads whose logits are cosines


@dataclass(frozen=True)
class LossSpec:
    """The objective. Its defaults are the default recipe (docs/QUALITY.md): ``distill train``'s
    options take theirs from here, so the recipe is stated once."""

    ce_weight: float = 0.0
    distill_weight: float = 1.0
    distill: str = "nmse"
    margin: str = "softmax"
    arc_scale: float = 32.0
    arc_margin: float = 0.3
    contrast_weight: float = 0.0  # on: +InfoNCE; at scale nMSE alone measured better (docs/QUALITY.md)
    contrast_temperature: float = 0.1
    # The relational term on the student's hardest impostor pairs, each pair's weight capped at a
    # tenth of its row's: ahead of nMSE alone at 76k and 279k samples, two seeds each (docs/QUALITY.md).
    pair_weight: float = 2.0
    pair_temperature: float = 0.1
    pair_focus: str = "student"
    pair_cap: float = 0.1  # the most weight any one pair can have in a row's relational term (1: no cap)
    distill_hardness: float = 0.0  # on: rows weighted by their own distillation term to this power
    distill_quality: float = 0.0  # on: rows weighted by the teacher embedding's norm to this power

    def __post_init__(self) -> None:
        for name, power in (("hardness", self.distill_hardness), ("quality", self.distill_quality)):
            if not 0 <= power < math.inf:
                raise BadOption(f"--distill-{name} is a power >= 0 (0: every row alike; e.g. 1), got {power}")
        if self.pair_focus not in PAIR_FOCUSES:
            raise BadOption(f"--pair-focus must be one of {', '.join(PAIR_FOCUSES)}, got {self.pair_focus!r}")
        if self.distill not in DISTILL_LOSSES:
            raise BadOption(f"--distill-loss must be one of {', '.join(DISTILL_LOSSES)}, got {self.distill!r}")
        weights = (self.ce_weight, self.distill_weight, self.contrast_weight, self.pair_weight)
        if min(weights) < 0 or sum(weights) == 0:
            raise BadOption(
                f"--ce-weight {self.ce_weight}, --distill-weight {self.distill_weight}, --contrast-weight "
                f"{self.contrast_weight} and --pair-weight {self.pair_weight} must be >= 0 and not all 0"
            )
        if not 0 < self.pair_cap <= 1:
            raise BadOption(f"--pair-cap is a share of a row's pair weights in (0, 1] (1: no cap; e.g. 0.1), got {self.pair_cap}")
        for name, t in (("contrast", self.contrast_temperature), ("pair", self.pair_temperature)):
            if not t > 0:
                raise BadOption(f"--{name}-temperature must be > 0 (e.g. 0.1), got {t}")
        if not self.arc_scale > 0:
            raise BadOption(f"--arc-scale must be > 0 (e.g. 64), got {self.arc_scale}")
        if not 0 <= self.arc_margin < math.pi / 2:
            raise BadOption(f"--arc-margin is an angle in radians in [0, pi/2) (e.g. 0.5), got {self.arc_margin}")

    @property
    def distils(self) -> bool:
        """A term compares the student's embeddings with the teacher's (distill, contrast or pair)."""
        return bool(self.distill_weight or self.contrast_weight or self.pair_weight)

    @classmethod
    def from_json(cls, d: dict) -> "LossSpec":
        """A saved spec; runs saved before the rename have ``mse_weight`` for ``distill_weight``."""
        d = dict(d)
        if "mse_weight" in d:
            d["distill_weight"] = d.pop("mse_weight")
        return cls(**d)


def arcface_logits(cosine, labels, scale: float, margin: float):
    """s * cos(theta + m) on the true class, s * cos(theta) elsewhere (insightface's form).

    Past theta = pi - m, cos(theta + m) would rise again; there the usual linear stand-in
    ``cos(theta) - m * sin(m)`` keeps the logit decreasing in theta.
    """
    import tensorflow as tf

    cos = tf.clip_by_value(cosine, -1.0 + 1e-7, 1.0 - 1e-7)
    sin = tf.sqrt(1.0 - cos * cos)
    with_margin = cos * math.cos(margin) - sin * math.sin(margin)
    with_margin = tf.where(cos > math.cos(math.pi - margin), with_margin, cos - margin * math.sin(margin))
    onehot = tf.one_hot(labels, tf.shape(cosine)[-1], dtype=cos.dtype)
    return scale * (onehot * with_margin + (1.0 - onehot) * cos)


def batch_targets(teacher_unit):
    """(the teacher targets of the whole global batch, gathered from every replica in replica
    order; the position of this replica's own rows among them: ``own[i]`` is row i's)."""
    import tensorflow as tf

    n = tf.shape(teacher_unit)[0]
    keys, first = teacher_unit, 0
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        keys = ctx.all_gather(teacher_unit, axis=0)  # this replica's rows start at id * n
        first = tf.cast(ctx.replica_id_in_sync_group, tf.int32) * n
    return keys, first + tf.range(n)


def contrast_loss(student_unit, teacher_unit, temperature: float):
    """Per-sample InfoNCE of unit student embeddings against the teacher targets of the whole
    global batch (sample i's positive is its own target)."""
    import tensorflow as tf

    keys, own = batch_targets(teacher_unit)
    logits = tf.matmul(student_unit, keys, transpose_b=True) / temperature
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=own, logits=logits)


def pair_loss(student_unit, teacher_unit, temperature: float, focus: str = "student", cap: float = 1.0):
    """Per-sample relational term: ``sum_j w_ij (cos(s_i, t_j) - cos(t_i, t_j))^2`` over the other
    targets j of the global batch, ``w_ij = softmax_j(cos(x_i, t_j) / T)`` without gradient, x the
    student (``focus`` "student": its hardest impostors weigh most) or the teacher ("teacher": the
    pairs the teacher finds most alike), each capped at ``cap``. 0 for a global batch of one."""
    import tensorflow as tf

    keys, own = batch_targets(teacher_unit)
    student_cos = tf.matmul(student_unit, keys, transpose_b=True)  # [n, N]
    teacher_cos = tf.matmul(teacher_unit, keys, transpose_b=True)
    other = 1.0 - tf.one_hot(own, tf.shape(keys)[0], dtype=student_cos.dtype)
    focus_cos = student_cos if focus == "student" else teacher_cos
    logits = tf.stop_gradient(focus_cos) / temperature - 1e9 * (1.0 - other)
    weights = tf.nn.softmax(logits, axis=-1) * other  # (all 0 when i is the batch's only row)
    if cap < 1:
        weights = tf.minimum(weights, cap)
    return tf.reduce_sum(weights * tf.square(student_cos - teacher_cos), axis=-1)


def row_weights(dist, teacher_norm, hardness: float, quality: float):
    """``x_i / mean_j(x_j)`` over the rows of the global batch (every replica's), for
    ``x_i = d_i^hardness * |t_i|^quality``, without gradient: per-row weights of mean 1 that grow
    with the row's own distillation term ``d_i`` and with its teacher embedding's norm. Computed
    from logs less the global batch's largest, so no power overflows float32 (|t|^25 would)."""
    import tensorflow as tf

    log_x = tf.zeros_like(dist)
    if hardness:
        log_x += hardness * tf.math.log(tf.maximum(dist, 1e-30))
    if quality:
        log_x += quality * tf.math.log(tf.maximum(teacher_norm, 1e-30))
    log_x = tf.stop_gradient(log_x)
    top = tf.reduce_max(log_x)
    ctx = tf.distribute.get_replica_context()
    many = ctx is not None and ctx.num_replicas_in_sync > 1
    if many:
        top = tf.reduce_max(ctx.all_gather(tf.reshape(top, [1]), axis=0))  # (ReduceOp has no MAX)
    x = tf.exp(log_x - top)  # (in (0, 1], the largest row of the global batch at 1)
    total, count = tf.reduce_sum(x), tf.cast(tf.shape(x)[0], x.dtype)
    if many:
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, total)
        count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
    return x * (count / total)


def unused_options(spec: "LossSpec") -> list[str]:
    """The options set away from their defaults that shape a term whose weight is 0, so change
    nothing (a user who sets ``--pair-cap`` without ``--pair-weight`` may think it acts). Pure."""
    default, unused = LossSpec(), []
    for weight, name, options in (
        (spec.distill_weight, "--distill-weight", ("distill", "distill_hardness", "distill_quality")),
        (spec.contrast_weight, "--contrast-weight", ("contrast_temperature",)),
        (spec.pair_weight, "--pair-weight", ("pair_temperature", "pair_focus", "pair_cap")),
    ):
        changed = [o for o in options if getattr(spec, o) != getattr(default, o)]
        if not weight and changed:
            flags = ", ".join(f"--{'distill-loss' if o == 'distill' else o.replace('_', '-')}" for o in changed)
            unused.append(f"{flags} change{'s' if len(changed) == 1 else ''} nothing: {name} is 0, so its term is off")
    return unused


def classifier_loss(logits, labels, spec: LossSpec, class_bias=None):
    """Cross-entropy of the labelled rows (label >= 0), averaged over the labelled rows of the
    global batch; unlabelled rows (label -1: faces of no known identity) take no part. Summed
    across replicas it is the plain mean over the global batch's labelled rows, whatever the
    number of workers; 0 for a batch with none."""
    import tensorflow as tf

    labelled = labels >= 0
    safe = tf.where(labelled, labels, tf.zeros_like(labels))  # (any class: the row is masked out below)
    logits = tf.cast(logits, tf.float32)
    if spec.margin in COSINE_MARGINS:
        logits = arcface_logits(logits, safe, spec.arc_scale, spec.arc_margin)
    if class_bias is not None:
        logits = logits + class_bias
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
    ce = tf.where(labelled, ce, tf.zeros_like(ce))
    count = tf.reduce_sum(tf.cast(labelled, tf.float32))
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
    return tf.reduce_sum(ce) / tf.maximum(count, 1.0)


def loss_parts(embedding, logits, teacher, labels, spec: LossSpec, global_batch_size: int | None = None,
               class_bias=None) -> dict:
    """Named loss parts of one (replica's) batch, each averaged over the global batch.

    ``class_bias`` ([C], 0 or a large negative number) takes classes out of the softmax: the
    held-out validation identities, which must not act even as negatives.
    """
    import tensorflow as tf

    teacher = tf.stop_gradient(tf.cast(teacher, tf.float32))  # the target, never trained
    embedding = tf.cast(embedding, tf.float32)
    s_unit, t_unit = tf.math.l2_normalize(embedding, -1), tf.math.l2_normalize(teacher, -1)
    cos = tf.reduce_sum(s_unit * t_unit, -1)
    # Only the terms in the loss are computed (and logged): an unused classifier over 85k
    # identities would cost a forward and backward pass of its own for nothing.
    parts, loss = {}, 0.0
    if spec.ce_weight:
        parts["ce"] = classifier_loss(logits, labels, spec, class_bias)
        loss += spec.ce_weight * parts["ce"]
    if spec.distill_weight:
        if spec.distill == "mse":
            dist = tf.reduce_mean(tf.square(embedding - teacher), axis=-1)
        elif spec.distill == "nmse":
            dist = 2.0 - 2.0 * cos
        else:
            dist = 1.0 - cos
        if spec.distill_hardness or spec.distill_quality:
            norm = tf.norm(teacher, axis=-1)
            dist = row_weights(dist, norm, spec.distill_hardness, spec.distill_quality) * dist
        parts["distill"] = tf.nn.compute_average_loss(dist, global_batch_size=global_batch_size)
        loss += spec.distill_weight * parts["distill"]
    if spec.contrast_weight:
        con = contrast_loss(s_unit, t_unit, spec.contrast_temperature)
        parts["contrast"] = tf.nn.compute_average_loss(con, global_batch_size=global_batch_size)
        loss += spec.contrast_weight * parts["contrast"]
    if spec.pair_weight:
        pair = pair_loss(s_unit, t_unit, spec.pair_temperature, spec.pair_focus, spec.pair_cap)
        parts["pair"] = tf.nn.compute_average_loss(pair, global_batch_size=global_batch_size)
        loss += spec.pair_weight * parts["pair"]
    cos = tf.nn.compute_average_loss(cos, global_batch_size=global_batch_size)
    return {"loss": loss, **parts, "cos": cos}
