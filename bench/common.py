"""What every benchmark shares: the machine description, markdown tables, timed child
processes (wall time and peak RSS), the bench images and the synthetic ResNet teacher.

Benchmarks are scripts, not tests: each ``bench/NAME.py`` prints markdown tables that go
into ``docs/BENCHMARKS.md`` as they are. Heavy imports (TensorFlow, Ray) stay inside the
functions that need them, and measured work runs in child processes so every variant pays
the same start-up and no variant inherits another's threads or caches.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The paths, child environment and process helpers the test suite and the benchmarks share
# live with the tests (tests never import bench/).
from tests.support import (  # noqa: E402,F401  (re-exported for the benchmarks)
    CHILD_ENV,
    GLINT12,
    MOBILEFACENET,
    ORL,
    SHARED,
    RayHead,
    build_tiny_teacher,
    command_lines,
    free_port,
    kill_tree,
    process_tree,
)

# ---------------------------------------------------------------------------- the machine

def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


# A benchmark's variants run one after another in child processes, so between two of them
# nothing of ours runs: CPU use measured then is other work. The 1-minute load average cannot
# say that (it still holds the previous variant for minutes), so the guard samples the CPU
# itself, and the load average is recorded beside it.
IDLE_LIMIT_PCT = 15.0  # of all CPUs, over the sample window
IDLE_WAIT_S = 300.0
IDLE_WINDOW_S = 3.0


@dataclass(frozen=True)
class Idleness:
    load: str  # load average (1/5/15 min) at the check
    busy_pct: float  # CPU in use by other processes over the window, % of all CPUs
    busy: bool  # still above the limit when the wait ran out

    def label(self) -> str:
        return f"{self.load}, {self.busy_pct:.0f}% CPU busy" + (" (BUSY: not a result)" if self.busy else "")


def add_idle_args(p) -> None:
    """The idle guard's options, the same in every benchmark."""
    p.add_argument("--idle-limit", type=float, default=IDLE_LIMIT_PCT,
                   help="before each variant, wait until other processes use at most this %% of the CPUs")
    p.add_argument("--idle-wait", type=float, default=IDLE_WAIT_S, help="seconds to wait for that before giving up")
    p.add_argument("--allow-busy", action="store_true",
                   help="on a machine that stays busy, go on and mark the rows BUSY instead of stopping")


def wait_for_idle(limit_pct: float, wait_s: float, window_s: float = IDLE_WINDOW_S,
                  sample=None, clock=time.monotonic) -> Idleness:
    """Sample CPU use over ``window_s`` until it is at most ``limit_pct`` or ``wait_s`` has passed.

    ``sample(window_s) -> percent`` defaults to psutil's whole-machine CPU use over the window.
    """
    if sample is None:
        import psutil

        def sample(window: float) -> float:
            return psutil.cpu_percent(interval=window)

    deadline = clock() + wait_s
    while True:
        pct = float(sample(window_s))
        if pct <= limit_pct:
            return Idleness(loadavg(), pct, False)
        if clock() >= deadline:
            return Idleness(loadavg(), pct, True)


def settle(a, what: str) -> Idleness:
    """The guard before one variant: wait for an idle machine; stop (or, with --allow-busy,
    mark the row) if it stays busy."""
    idle = wait_for_idle(a.idle_limit, a.idle_wait)
    if idle.busy and not a.allow_busy:
        raise SystemExit(
            f"the machine stayed busy for {a.idle_wait:.0f} s before {what}: other processes use "
            f"{idle.busy_pct:.0f}% of the CPUs (load {idle.load}); a table taken under load is not a result. "
            "Stop them (stray Ray clusters and test runs count: see `ps aux --sort=-%cpu`), or pass "
            "--allow-busy to go on with the rows marked BUSY"
        )
    return idle


def _version(*dists: str) -> str:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def machine() -> dict[str, str]:
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "memory": f"{mem_total_gib():.1f} GiB",
        "gpu": "none",
        "load average (1/5/15 min)": loadavg(),
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow-cpu", "tensorflow"),
        "keras": _version("keras"),
        "ray": _version("ray"),
        "pyarrow": _version("pyarrow"),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
        "redis-server": _redis_version(),
    }


def _redis_version() -> str:
    exe = shutil.which("redis-server")
    if not exe:
        return "not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())


def print_header(title: str, argv: Sequence[str] | None = None) -> None:
    """The bench's title, the exact command and the machine, as markdown."""
    cmd = " ".join(["python", *(argv if argv is not None else sys.argv)])
    print(f"## {title}\n")
    print(f"Command: `{cmd}`\n")
    print(table(["machine", ""], list(machine().items())))
    print()


# ---------------------------------------------------------------------------- output

def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


# ---------------------------------------------------------------------------- child processes

@dataclass(frozen=True)
class ChildResult:
    returncode: int
    seconds: float
    peak_rss_mib: float
    stdout: str
    stderr: str
    cpu_series: tuple[tuple[float, float], ...] = ()  # (time.time(), CPU seconds of the process tree)

    def json(self) -> dict:
        """The last stdout line that is a JSON object (how bench children report)."""
        for line in reversed(self.stdout.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"child printed no JSON result; stderr tail:\n{self.stderr[-3000:]}")


def run_child(cmd: Sequence[str], env: dict | None = None, timeout: float = 1800, check: bool = True,
              sample_cpu: float | None = None, cwd: str | None = None) -> ChildResult:
    """Run a process; wall time and its own peak RSS (not the whole tree's).

    Peak RSS is the child's ``VmHWM`` polled while it runs: ``ru_maxrss`` would also count
    the pages of this process that the child shared between fork and exec.

    With ``sample_cpu`` (seconds), the CPU time of the whole process tree (the child, Ray's
    processes it starts, their workers) is sampled that often: on a shared machine CPU
    seconds per image are a steadier measure of work than wall-clock rates.
    """
    series: list[tuple[float, float]] = []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=out, stderr=err, env={**os.environ, **CHILD_ENV, **(env or {})},
                                cwd=cwd)
        deadline = t0 + timeout
        next_sample = 0.0
        tree = TreeCpu(proc.pid)
        hwm = 0
        while True:
            hwm = max(hwm, _vm_hwm_kib(proc.pid))
            now = time.perf_counter()
            if sample_cpu and now >= next_sample:
                series.append((time.time(), tree.sample()))
                next_sample = now + sample_cpu
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if now > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        res = ChildResult(proc.returncode, seconds, hwm / 1024, out.read().decode(errors="replace"),
                          err.read().decode(errors="replace"), tuple(series))
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {res.returncode}\n--- stdout\n{res.stdout[-3000:]}\n"
                           f"--- stderr\n{res.stderr[-5000:]}")
    return res


def _vm_hwm_kib(pid: int) -> int:
    """The peak RSS Linux keeps for a process (``VmHWM``); psutil reports only the current RSS."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeCpu:
    """CPU seconds (user + system) used so far by a process and all its descendants (psutil).

    Every process ever seen in the tree keeps its last reading, so the total never drops when
    Ray kills its workers at the end of a run (nobody reaps them into a parent's ``cutime``);
    what a process used after its last sample is missed (at most one sampling interval).
    """

    def __init__(self, root: int):
        self.root = root
        self.seen: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU seconds

    def sample(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            try:
                t = proc.cpu_times()
                self.seen[(proc.pid, proc.create_time())] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return sum(self.seen.values())


def distill_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "distill", *map(str, args)]


def this_script_cmd(script: str, *args: object) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / script), *map(str, args)]


# ---------------------------------------------------------------------------- bench inputs

def make_face_jpegs(out: Path, n: int, size: int = 112, quality: int = 92) -> Path:
    """``n`` distinct ``size``x``size`` RGB JPEGs in identity folders, made from the ORL faces.

    emore's images are 112x112 RGB JPEGs; ORL's are grey 92x112 PGMs, so each is resized,
    given a per-copy colour tint and a small shift (copies beyond the 400 originals differ in
    pixels, so no decoder or cache sees the same bytes twice). Deterministic.
    """
    import numpy as np
    from PIL import Image

    marker = out / f".made-{n}-{size}-{quality}"
    if marker.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    sources = sorted(ORL.glob("s*/*.pgm"), key=lambda p: (int(p.parent.name[1:]), int(p.stem)))
    if not sources:
        raise FileNotFoundError(f"no ORL faces under {ORL}: the bench images are made from them")
    rng = np.random.default_rng(0)
    for i in range(n):
        src = sources[i % len(sources)]
        copy = i // len(sources)
        grey = np.asarray(Image.open(src).convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32)
        tint = rng.uniform(0.8, 1.2, 3) if copy else np.ones(3)
        rgb = np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)
        if copy:
            rgb = np.roll(rgb, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        folder = out / src.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, "RGB").save(folder / f"{copy:03d}_{src.stem}.jpg", quality=quality)
    marker.touch()
    return out


def build_resnet18_teacher(out: Path, dim: int = 512, size: int = 112, seed: int = 0) -> Path:
    """A ResNet-18 (basic blocks [2, 2, 2, 2], widths 64..512, 7x7/2 stem + max-pool) at
    ``size``x``size`` with random weights and a ``dim``-d BN embedding, exported like a real
    face teacher (input ``input`` [N, size, size, 3] float32, output ``embeddings``)."""
    if (out / "saved_model.pb").exists():
        return out
    import keras
    from keras import layers

    from distill.teacher import export_keras_teacher

    keras.utils.set_random_seed(seed)

    def block(x, filters, stride):
        shortcut = x
        y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = layers.ReLU()(layers.BatchNormalization()(y))
        y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
        y = layers.BatchNormalization()(y)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = layers.BatchNormalization()(layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x))
        return layers.ReLU()(layers.Add()([y, shortcut]))

    inp = keras.Input((size, size, 3), name="input")
    x = layers.Conv2D(64, 7, strides=2, padding="same", use_bias=False)(inp)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    for i, w in enumerate((64, 128, 256, 512)):
        x = block(x, w, 1 if i == 0 else 2)
        x = block(x, w, 1)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.BatchNormalization()(layers.Dense(dim, use_bias=False)(x))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_keras_teacher(keras.Model(inp, x, name="resnet18_teacher"), str(tmp))
    os.replace(tmp, out)
    return out


def model_flops(model) -> float:
    """Forward FLOPs per image (2 x multiply-adds) of a Keras model's conv and dense layers.

    Counts Conv2D, DepthwiseConv2D and Dense, which hold all but a few percent of the work
    in CNNs; batch norm, activations and pooling are left out (stated where it is used).
    """
    import numpy as np
    from keras import layers

    total = 0.0
    for layer in _all_layers(model):
        if isinstance(layer, layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2.0 * h * w * c * kh * kw
        elif isinstance(layer, layers.Conv2D):
            _, h, w, cout = layer.output.shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            total += 2.0 * h * w * cout * kh * kw * cin / layer.groups
        elif isinstance(layer, layers.Dense):
            total += 2.0 * layer.input.shape[-1] * layer.units
        elif hasattr(layer, "centres"):  # the student's cosine classifier: a [D, C] matmul
            total += 2.0 * float(np.prod(layer.centres.shape))
    return total


def _all_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _all_layers(layer)
        else:
            yield layer
