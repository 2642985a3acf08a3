"""Quality gates for pipelines that retrain students: ``distill evaluate --min-tar FAR=TAR``
and ``--max-tar-gap FAR=GAP`` judge the results on every verification set, and evaluate exits
1 when one falls short.

A gate is judged only where the data supports its figure: a FAR whose TAR the impostor pairs
cannot support (``distill.metrics.far_supported``) fails the gate with that reason, so a CI job
never passes on a number that was never measured. Pure functions of the results dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.errors import BadOption
from distill.metrics import FARS, far_key, min_impostor_pairs

KINDS = {"min_tar": "--min-tar", "max_tar_gap": "--max-tar-gap"}


@dataclass(frozen=True)
class Gate:
    kind: str  # "min_tar": the model's TAR at FAR at least value; "max_tar_gap": teacher's minus model's at most value
    far: float
    value: float

    def __str__(self) -> str:
        return f"{KINDS[self.kind]} {far_key(self.far)}={self.value:g}"


def parse_gates(text: str | None, kind: str) -> tuple[Gate, ...]:
    """``"1e-3=0.6,1e-4=0.3"`` -> gates; a FAR the tables do not report, or a value outside
    [0, 1], is refused with the accepted forms."""
    option = KINDS[kind]
    gates = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        far_text, eq, value_text = part.partition("=")
        try:
            far, value = float(far_text), float(value_text)
        except ValueError:
            far = value = float("nan")
        if not eq or value != value:
            raise BadOption(f"{option} {part!r}: expected FAR=VALUE, e.g. {option} 1e-3=0.6 (several: comma-separated)")
        match = [f for f in FARS if abs(f - far) <= 1e-9 * f]
        if not match:
            raise BadOption(f"{option} {part!r}: the FAR must be one of {', '.join(far_key(f) for f in FARS)} (the "
                            "operating points evaluate reports)")
        if not 0 <= value <= 1:
            raise BadOption(f"{option} {part!r}: a TAR {'gap ' if kind == 'max_tar_gap' else ''}is in [0, 1]")
        gates.append(Gate(kind, match[0], value))
    return tuple(gates)


def judge(results: dict[str, Any], gates: tuple[Gate, ...]) -> list[dict[str, Any]]:
    """One verdict per gate and verification set: ``passed`` True or False, and the figures."""
    verdicts = []
    for gate in gates:
        key = far_key(gate.far)
        for target in results["targets"]:
            models, ds = target["models"], target["dataset"]
            where = ds["path"]
            model = (models["model"].get("tar_at_far") or {}).get(key)
            teacher = (models.get("teacher", {}).get("tar_at_far") or {}).get(key)
            verdict: dict[str, Any] = {"gate": str(gate), "set": where, "model_tar": model, "teacher_tar": teacher}
            if model is None or (gate.kind == "max_tar_gap" and teacher is None):
                if gate.kind == "max_tar_gap" and "teacher" not in models:
                    reason = "no teacher to compare with: pass --teacher"
                else:
                    reason = (f"TAR@{key} is not supported by this set's {ds['impostor_pairs']:,} distinct impostor "
                              f"pairs (it needs {min_impostor_pairs(gate.far):,}): the gate cannot pass on it")
                verdicts.append({**verdict, "passed": False, "reason": reason})
                continue
            if gate.kind == "min_tar":
                passed = model >= gate.value
                reason = f"TAR@{key} {model:.4f} {'>=' if passed else '<'} {gate.value:g}"
            else:
                gap = teacher - model
                passed = gap <= gate.value
                reason = (f"TAR@{key} gap {gap:.4f} (teacher {teacher:.4f}, model {model:.4f}) "
                          f"{'<=' if passed else '>'} {gate.value:g}")
            verdicts.append({**verdict, "passed": passed, "reason": reason})
    return verdicts
