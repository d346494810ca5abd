"""Each `Point` in a process of its own, within a time budget, its compiles done ahead by a precompile process.

A point's process measures one case alone: peak memory over its first two steps, then timed steps without
interleaving (a lent GPU is not shared). A fault there (a CUDA illegal memory access poisons every later case of a
process) cannot touch the next point.

Compiling is what made the GPU suite outgrow its time: a cold flex or torch.compile graph takes tens of seconds to
minutes, and every point that compiles did so inside its own timed process, one after another. Here a precompile
process starts with the suite and runs the first step of every point that compiles (flex attention, torch.compile),
in the order the rows will want them, while the points that compile nothing are measured beside it. Every process
of the suite shares one compile cache (`compile_environment`: inductor's FX graph and AOTAutograd caches, Triton's
kernels, in one folder), so a compiling point's own process finds its graphs there and loads them instead of
compiling; such a point starts once the precompile process is done with it (or failed it: then it compiles alone).
`budget_s` bounds the whole: a point still running at the end is stopped and, like every point not started by then,
reported as not measured for the budget; `Point.timeout_s` bounds each process, so a hang cannot eat the budget.

Every timing says where its process's time went (`PointTiming.phases`, the wall seconds seen from the suite, the
seconds the precompile process spent on it) and what the compile caches did there (`PointTiming.compile_cache`).
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from hf_posvariants.evaluation.bench.cases import Case, KernelCase, Point
from hf_posvariants.evaluation.bench.measurement import (
    Runner,
    Timing,
    eager_scores_fit,
    kernel_step,
    model_flops,
    process_status_mib,
    reset_peak_rss,
    synchronize,
    timed_seconds,
)

NOT_MEASURED_BUDGET = "not measured: budget"


class PointTiming(Timing):
    """What one point's process measured, or why it has no figures, and where its time went: `phases` (seconds in
    its process: building, the first step — compiling or loading compiled code included —, the other steps, the
    FLOP count), `process_s` (its process's wall seconds as the suite saw them), `compile_cache` (the cache folder
    its process used, that cache's hits and misses there), `precompile` (for a point that compiles: the seconds the
    precompile process spent on it, the error it met, its cache counts for this point)."""

    def __init__(self, point: Point):
        super().__init__(point.case, point.task, point.length)
        self.point = point
        self.phases: dict[str, float] = {}
        self.process_s: float | None = None
        self.compile_cache: dict = {}
        self.precompile: dict = {}

    def compile_s(self) -> float | None:
        """Seconds the first step took beyond a timed one: compiling, or loading what was compiled before."""
        if "first step" not in self.phases or self.median_ms is None:
            return None
        return max(0.0, self.phases["first step"] - self.median_ms / 1000)

    def as_dict(self, peak_tflops: float | None = None) -> dict:
        median, new_tokens = self.median_ms, self.point.new_tokens
        return super().as_dict(peak_tflops) | {
            "label": self.point.label, "shape": asdict(self.point.shape), "new_tokens": new_tokens,
            "per_token_ms": median / new_tokens if median and new_tokens else None,
            "compiles": self.point.compiles, "phases": self.phases, "process_s": self.process_s,
            "compile_s": self.compile_s(), "compile_cache": self.compile_cache, "precompile": self.precompile,
        }


# ---- in a point's process -------------------------------------------------------------------------------

def point_step(point: Point, device: str, amp: bool) -> Callable[[], None]:
    if isinstance(point.case, KernelCase):
        shape = point.shape
        return kernel_step(point.case, shape.batch_size, shape.num_attention_heads, point.length,
                           shape.hidden_size // shape.num_attention_heads, device,
                           torch.bfloat16 if amp else torch.float32)
    runner = Runner(point.case, point.shape, point.length, device, amp, point.new_tokens)
    return functools.partial(runner.step, point.task)


MEMORY_STEPS = 2


def measure_point(point: Point, device: str, amp: bool, warmup: int, rounds: int) -> PointTiming:
    """In this process: peak memory over the first two steps (after one for a step that keeps nothing, so a
    compiled kernel is not counted), which count as warm-up, the rest of `warmup`, `rounds` timed steps, then
    the model FLOPs; the wall seconds of each phase."""
    timing = PointTiming(point)
    clock = time.perf_counter
    begin = clock()
    step = point_step(point, device, amp)
    timing.phases["build"] = clock() - begin
    begin = clock()
    if point.task != "train":
        step()
        synchronize(device)
        timing.phases["first step"] = clock() - begin
    if device.startswith("cuda"):
        built = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
        built = process_status_mib("VmRSS")
    for _ in range(MEMORY_STEPS):
        step()
        synchronize(device)
        timing.phases.setdefault("first step", clock() - begin)
    if device.startswith("cuda"):
        timing.peak_memory_mib = (torch.cuda.max_memory_allocated() - built) / 2**20
    else:
        timing.peak_memory_mib = process_status_mib("VmHWM") - built
    for _ in range(warmup - MEMORY_STEPS):
        step()
    timing.seconds = [timed_seconds(step, device, "wall") for _ in range(rounds)]
    timing.phases["steps"] = clock() - begin - timing.phases["first step"]
    del step
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if isinstance(point.case, Case) and point.task != "generate" and eager_scores_fit(point.shape, point.length):
        begin = clock()
        timing.flops = model_flops(point.case, point.shape, point.length, point.task, device, amp)
        timing.phases["FLOP count"] = clock() - begin
    return timing


def compile_environment(folder: Path) -> dict[str, str]:
    """The variables that make inductor and Triton keep what they compile in `folder`, shared by every process
    of a suite: inductor's FX graph and AOTAutograd caches on (a process compiling a graph another compiled
    loads it), Triton's kernels beside them."""
    folder = Path(folder).resolve()
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder), "TRITON_CACHE_DIR": str(folder / "triton"),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def prepare_process(settings: dict) -> None:
    """What every process of the suite sets first. The cache switches are set on the configs too: inductor reads
    its variables when imported, which the forkserver did before this suite's variables existed."""
    os.environ.update(settings["environment"])
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    torch._inductor.config.compile_threads = settings["compile_threads"]
    if not settings["compile"]:
        torch.compiler.set_stance("force_eager")  # torch.compile and flex run uncompiled: no code generation
    if not settings["device"].startswith("cuda"):
        torch.set_num_threads(settings["threads"])


# inductor's counters of its compile caches: (counter group, counter) by the name reported
CACHE_COUNTERS = {"fx_graph_hits": ("inductor", "fxgraph_cache_hit"), "fx_graph_misses": ("inductor", "fxgraph_cache_miss"),
                  "autograd_hits": ("aot_autograd", "autograd_cache_hit"),
                  "autograd_misses": ("aot_autograd", "autograd_cache_miss")}


def compile_cache_state(since: dict | None = None) -> dict:
    """The compile cache this process uses: its folders, and inductor's FX graph and AOTAutograd cache hits and
    misses (since the counts `since`, if given)."""
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    counts = {name: counters[group][counter] - (since or {}).get(name, 0)
              for name, (group, counter) in CACHE_COUNTERS.items()}
    return {"dir": cache_dir(), "triton_dir": os.environ.get("TRITON_CACHE_DIR")} | counts


def describe(error: BaseException) -> str:
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def _point_process(point: Point, settings: dict, connection) -> None:
    """The body of one point's process: its figures or its error go back through `connection`."""
    try:
        prepare_process(settings)
        timing = measure_point(point, settings["device"], settings["amp"], settings["warmup"], settings["rounds"])
        connection.send({"seconds": timing.seconds, "peak_memory_mib": timing.peak_memory_mib,
                         "flops": timing.flops, "phases": timing.phases, "compile_cache": compile_cache_state()})
    except BaseException as error:  # noqa: BLE001 — every failure is a row of the table
        connection.send({"error": describe(error)})
    finally:
        connection.close()


def _precompile_process(indexed: list[tuple[int, Point]], settings: dict, connection) -> None:
    """The body of the precompile process: the first step of each point in turn, which compiles what the point's
    own process will find in the cache. It stops at the first failure (on a GPU it may have poisoned the
    process); the suite starts a fresh one for the points left."""
    try:
        prepare_process(settings)
        for index, point in indexed:
            connection.send({"start": index})
            before = compile_cache_state()
            begin = time.perf_counter()
            try:
                step = point_step(point, settings["device"], settings["amp"])
                step()
                synchronize(settings["device"])
                del step
                if settings["device"].startswith("cuda"):
                    torch.cuda.empty_cache()
            except BaseException as error:  # noqa: BLE001 — the point's own process meets it again and reports it
                connection.send({"done": index, "seconds": time.perf_counter() - begin, "error": describe(error)})
                return
            connection.send({"done": index, "seconds": time.perf_counter() - begin,
                             "compile_cache": compile_cache_state(since=before)})
    finally:
        connection.close()


# ---- the suite's side ------------------------------------------------------------------------------

class _Child:
    """A process of the suite and the receiving end of its pipe."""

    def __init__(self, context, target: Callable, args: tuple):
        receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=target, args=(*args, sender), daemon=True)
        self.process.start()
        sender.close()
        self.receiver = receiver
        self.started = time.monotonic()

    def messages(self) -> list[dict]:
        """What it has sent so far."""
        received = []
        try:
            while self.receiver.poll():
                received.append(self.receiver.recv())
        except (EOFError, OSError):  # it ended: what it sent before is kept
            pass
        return received

    def ended(self) -> bool:
        return self.process.exitcode is not None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stop(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join()
        self.receiver.close()

    def exit_note(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"signal {signal.Signals(-code).name}"
        return f"exit code {code}"


# What the forkserver imports once for every process of a suite: none of it touches a GPU.
FORKSERVER_PRELOAD = [__name__, "torch._dynamo", "torch._inductor.compile_fx", "torch.nn.attention.flex_attention"]
START_METHODS = ("forkserver", "spawn")


class _SuiteRun:
    """The state of one `run_points`: the points waiting, the point processes running (at most `jobs`), the
    precompile process and what it has done, the deadline."""

    def __init__(self, points: list[Point], settings: dict, jobs: int, budget_s: float | None, precompile: bool,
                 context, log: Callable[[str], None]):
        self.points, self.settings, self.jobs, self.context, self.log = points, settings, jobs, context, log
        self.begin = time.monotonic()
        self.deadline = self.begin + budget_s if budget_s else float("inf")
        self.timings = [PointTiming(point) for point in points]
        self.waiting = list(range(len(points)))
        self.running: dict[int, _Child] = {}
        # index → "pending", "ready" or "failed", for the points the precompile process takes
        self.precompiled = {index: "pending" for index, point in enumerate(points) if precompile and point.compiles}
        self.compiler: _Child | None = None
        self.compiler_points: list[int] = []  # the points given to the precompile process running
        self.compiling: int | None = None
        self.compiling_since = 0.0
        self.idle_s = 0.0  # seconds with no point process running while points waited (for their compiles)

    def ready(self, index: int) -> bool:
        return self.precompiled.get(index, "ready") in ("ready", "failed")

    def run(self) -> list[PointTiming]:
        while self.waiting or self.running:
            if time.monotonic() >= self.deadline:
                self.spend_budget()
                break
            self.start_compiler()
            self.start_points()
            waited = time.monotonic()
            self.wait()
            if not self.running and self.waiting:
                self.idle_s += time.monotonic() - waited
            self.collect_compiler()
            self.collect_points()
        if self.compiler is not None:
            self.end_compiler(NOT_MEASURED_BUDGET)
        return self.timings

    def start_compiler(self) -> None:
        pending = [(index, self.points[index]) for index, state in self.precompiled.items() if state == "pending"]
        if self.compiler is None and pending:
            self.compiler = _Child(self.context, _precompile_process, (pending, self.settings))
            self.compiler_points = [index for index, _ in pending]
            self.log(f"started precompile: {len(pending)} points (pid {self.compiler.process.pid})")

    def start_points(self) -> None:
        for index in [index for index in self.waiting if self.ready(index)]:
            if len(self.running) >= self.jobs:
                return
            self.waiting.remove(index)
            child = _Child(self.context, _point_process, (self.points[index], self.settings))
            self.running[index] = child
            self.log(f"started {self.points[index].label} (pid {child.process.pid})")

    def end_by(self, index: int) -> float:
        return min(self.running[index].started + self.points[index].timeout_s, self.deadline)

    def wait(self) -> None:
        """Until a process sends or ends, or the nearest time limit: a process must not run past its own unnoticed."""
        ends = [self.end_by(index) for index in self.running] + [self.deadline]
        if self.compiling is not None:
            ends.append(self.compiling_since + self.points[self.compiling].timeout_s)
        wait_s = min(0.5, max(0.0, min(ends) - time.monotonic()))
        children = list(self.running.values()) + ([self.compiler] if self.compiler else [])
        multiprocessing.connection.wait([child.receiver for child in children], timeout=wait_s)

    def collect_compiler(self) -> None:
        if self.compiler is None:
            return
        ended = self.compiler.ended()  # before reading: everything an ended process sent is read below
        for message in self.compiler.messages():
            if "start" in message:
                self.compiling, self.compiling_since = message["start"], time.monotonic()
                continue
            index = message.pop("done")
            self.timings[index].precompile = message
            self.precompiled[index] = "failed" if "error" in message else "ready"
            self.compiling = None
            outcome = f"failed ({message['error']})" if "error" in message else "done"
            self.log(f"precompile {outcome} in {message['seconds']:.1f} s: {self.points[index].label}")
        over = self.compiling is not None and time.monotonic() - self.compiling_since > self.points[self.compiling].timeout_s
        if over or ended:
            self.end_compiler("timed out" if over else f"process died: {self.compiler.exit_note()}")

    def end_compiler(self, why: str) -> None:
        """Stop the precompile process; the point it was on fails with `why` (or, if it died between points or
        before its first, the next it had: each start makes progress), the next start takes the rest. It ends
        by itself, exit code 0, after its last point or its first failure."""
        self.compiler.stop()
        died = self.compiler.process.exitcode != 0
        self.compiler = None
        if self.compiling is None and died:
            self.compiling = next((index for index in self.compiler_points if self.precompiled[index] == "pending"),
                                  None)
            self.compiling_since = time.monotonic()
        if self.compiling is not None:
            seconds = time.monotonic() - self.compiling_since
            self.timings[self.compiling].precompile = {"seconds": seconds, "error": why}
            self.precompiled[self.compiling] = "failed"
            self.log(f"precompile {why} after {seconds:.0f} s: {self.points[self.compiling].label}")
            self.compiling = None

    def collect_points(self) -> None:
        for index, child in list(self.running.items()):
            timing = self.timings[index]
            ended = child.ended()  # before reading: everything an ended process sent is read below
            messages = child.messages()
            if messages:
                self.record(timing, messages[-1])
            elif not ended and time.monotonic() < self.end_by(index):
                continue
            elif not ended:
                timing.error = (f"{NOT_MEASURED_BUDGET} (stopped after {child.elapsed():.0f} s)"
                                if self.end_by(index) >= self.deadline else f"timed out after {child.elapsed():.0f} s")
            timing.process_s = child.elapsed()
            child.stop()
            if timing.error is None and not timing.seconds:
                timing.error = f"process died: {child.exit_note()}"
            del self.running[index]
            self.log(f"{'failed (' + timing.error + ')' if timing.error else 'done'} in {timing.process_s:.1f} s"
                     f"{phase_note(timing.phases)}: {self.points[index].label}")

    @staticmethod
    def record(timing: PointTiming, result: dict) -> None:
        timing.error = result.get("error")
        timing.seconds = result.get("seconds", [])
        timing.peak_memory_mib = result.get("peak_memory_mib")
        timing.flops = result.get("flops")
        timing.phases = result.get("phases", {})
        timing.compile_cache = result.get("compile_cache", {})

    def spend_budget(self) -> None:
        """The deadline: every point still running is stopped, every point waiting is not measured."""
        for index, child in list(self.running.items()):
            child.stop()
            self.timings[index].process_s = child.elapsed()
            self.timings[index].error = f"{NOT_MEASURED_BUDGET} (stopped after {child.elapsed():.0f} s)"
            self.log(f"stopped for the budget: {self.points[index].label}")
        self.running.clear()
        for index in self.waiting:
            self.timings[index].error = f"{NOT_MEASURED_BUDGET} (not started)"
        self.log(f"budget spent: {len(self.waiting)} points not started")
        self.waiting.clear()

    def summary(self) -> dict:
        """Where the suite's time went."""
        return {
            "seconds": time.monotonic() - self.begin,
            "point_process_s": sum(t.process_s or 0.0 for t in self.timings),
            "precompile_s": sum(t.precompile.get("seconds", 0.0) for t in self.timings),
            "idle_s": self.idle_s,
            "not_measured_budget": sum(bool(t.error and t.error.startswith(NOT_MEASURED_BUDGET)) for t in self.timings),
        }


def phase_note(phases: dict[str, float]) -> str:
    return f" ({', '.join(f'{name} {seconds:.1f}' for name, seconds in phases.items())})" if phases else ""


def run_points(points: list[Point], device: str, amp: bool, warmup: int, rounds: int, compile: bool = True,
               jobs: int = 1, budget_s: float | None = None, start_method: str = "forkserver",
               log: Callable[[str], None] = print, compile_cache: Path | None = None,
               precompile: bool = True) -> tuple[list[PointTiming], dict]:
    """Each point in a fresh process, `jobs` at a time, in the order given (a point that compiles once the
    precompile process is done with it); a point that fails, crashes or runs past its `timeout_s` becomes a timing
    with that error, one still running or not started when `budget_s` is spent one that says it was not measured.
    Returns the timings and where the time went (`_SuiteRun.summary`).

    The processes fork from a server that imported torch, transformers and this package once and never
    touched a GPU (multiprocessing's forkserver): each starts in milliseconds with a CUDA context of its own;
    `start_method="spawn"` starts each from scratch instead (seconds of imports per point). `compile=False` runs
    torch.compile and flex attention uncompiled (a dry run checks that every point builds, runs and reports,
    not what code generation makes of it). `compile_cache`: the folder every process compiles into (default:
    inductor's own); `precompile=False` leaves each point to compile in its own process."""
    if start_method not in START_METHODS:
        raise ValueError(f"start_method={start_method!r} is not supported; allowed values are {list(START_METHODS)}.")
    # torch's CUDA check through NVML leaves the driver uninitialised in the server the processes fork from.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
    settings = {"device": device, "amp": amp, "warmup": warmup, "rounds": rounds, "compile": compile,
                "threads": max(1, (os.cpu_count() or 1) // max(jobs, 1)),
                # the precompile process's compile workers leave a core to each point process
                "compile_threads": max(1, (os.cpu_count() or 1) - jobs),
                "environment": compile_environment(compile_cache) if compile_cache else {}}
    suite = _SuiteRun(points, settings, jobs, budget_s, precompile, context, log)
    timings = suite.run()
    return timings, suite.summary()
