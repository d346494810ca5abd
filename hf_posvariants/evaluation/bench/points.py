"""Each `Point` in a process of its own, within a time budget, its compiles done ahead by precompile processes.

A point's process measures one case alone: peak memory over its first two steps, then timed steps without
interleaving (a lent GPU is not shared). A fault there (a CUDA illegal memory access poisons every later case of a
process) cannot touch the next point.

Compiling is what made the GPU suite outgrow its time: a cold flex or torch.compile graph takes tens of seconds to
minutes, and every point that compiles did so inside its own timed process, one after another. Here precompile
processes (`precompile_jobs` at a time) start with the suite and run the first step of every point that compiles
(flex attention, torch.compile), one point at a time each, in the order the rows will want them, while the points
that compile nothing are measured beside them. Every process of the suite shares one compile cache
(`compile_environment`: inductor's FX graph and AOTAutograd caches, Triton's kernels, in one folder), so a compiling
point's own process finds its graphs there and loads them instead of compiling; such a point starts once its
precompile is done, or failed (then it compiles alone: a failure may be its precompile process's, poisoned by an
earlier point), except past its timeout (it would time out again, and is reported as not run).
`budget_s` bounds the whole: a point still running at the end is stopped and, like every point not started by then,
reported as not measured for the budget; `Point.timeout_s` bounds each process, so a hang cannot eat the budget.

Every timing says where its process's time went (`PointTiming.phases`, the wall seconds seen from the suite, the
seconds its precompile took) and what the compile caches did there (`PointTiming.compile_cache`).
"""

from __future__ import annotations

import functools
import gc
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
    describe,
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
    FLOP count), `started_s` and `process_s` (when its process started, in seconds since the suite did, and its wall
    seconds as the suite saw them), `compile_cache` (the cache folder its process used, that cache's hits and misses
    there), `precompile` (for a point that compiles: when its precompile started, the seconds its first step took in
    a precompile process, the error it met there, the cache counts of that step)."""

    def __init__(self, point: Point):
        super().__init__(point.case, point.task, point.length)
        self.point = point
        self.phases: dict[str, float] = {}
        self.started_s: float | None = None
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
            "compiles": self.point.compiles, "phases": self.phases, "started_s": self.started_s,
            "process_s": self.process_s,
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


def _precompile_process(settings: dict, connection) -> None:
    """The body of a precompile process: for each point the suite sends, its first step, which compiles what the
    point's own process will find in the cache; None ends it. After a failure it ends too (on a GPU the failure
    may have poisoned the process): the suite starts a fresh one for the points left."""
    try:
        prepared = False
        while (point := connection.recv()) is not None:
            before, begin = None, time.perf_counter()
            try:
                if not prepared:  # here, so that a failure to prepare is one point's failure
                    prepare_process(settings)
                    prepared = True
                before = compile_cache_state()
                step = point_step(point, settings["device"], settings["amp"])
                step()
                synchronize(settings["device"])
                del step
                gc.collect()  # a compiled forward and its model hold each other: free the model before the next
                if settings["device"].startswith("cuda"):
                    torch.cuda.empty_cache()
            except BaseException as error:  # noqa: BLE001 — the point's own process meets it again and reports it
                connection.send({"seconds": time.perf_counter() - begin, "error": describe(error)})
                return
            connection.send({"seconds": time.perf_counter() - begin, "compile_cache": compile_cache_state(before)})
    finally:
        connection.close()


# ---- the suite's side ------------------------------------------------------------------------------

class _Child:
    """A process of the suite and the suite's end of its pipe (both ways if `duplex`: a precompile process is
    sent its points one at a time)."""

    def __init__(self, context, target: Callable, args: tuple, duplex: bool = False):
        receiver, sender = context.Pipe(duplex=duplex)
        self.process = context.Process(target=target, args=(*args, sender), daemon=True)
        self.process.start()
        sender.close()
        self.receiver = receiver
        self.started = time.monotonic()
        self.point: int | None = None  # a precompile process's point at hand
        self.since = 0.0

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
    precompile processes (at most `precompile_jobs`) and what they have done, the deadline."""

    def __init__(self, points: list[Point], settings: dict, jobs: int, budget_s: float | None, precompile_jobs: int,
                 context, log: Callable[[str], None]):
        self.points, self.settings, self.jobs, self.context, self.log = points, settings, jobs, context, log
        self.precompile_jobs = precompile_jobs
        self.begin = time.monotonic()
        self.deadline = self.begin + budget_s if budget_s else float("inf")
        self.timings = [PointTiming(point) for point in points]
        self.waiting = list(range(len(points)))
        self.running: dict[int, _Child] = {}
        # index → "pending", "compiling", "ready" or "failed", for the points the precompile processes take
        self.precompiled = {index: "pending" for index, point in enumerate(points) if precompile_jobs and point.compiles}
        self.compilers: list[_Child] = []
        self.idle_s = 0.0  # seconds with no point process running while points waited (for their compiles)

    def ready(self, index: int) -> bool:
        return self.precompiled.get(index, "ready") in ("ready", "failed")

    def run(self) -> list[PointTiming]:
        while self.waiting or self.running:
            if time.monotonic() >= self.deadline:
                self.spend_budget()
                break
            self.start_compiles()
            self.start_points()
            waited = time.monotonic()
            self.wait()
            if not self.running and self.waiting:
                self.idle_s += time.monotonic() - waited
            self.collect_compiles()
            self.collect_points()
        for compiler in list(self.compilers):
            self.end_compiler(compiler, NOT_MEASURED_BUDGET)
        return self.timings

    def start_compiles(self) -> None:
        """Each idle precompile process gets the next point waiting for its compile (in the points' order); one
        starts while fewer than `precompile_jobs` run and points wait; an idle one with nothing left ends."""
        pending = [index for index, state in self.precompiled.items() if state == "pending"]
        while len(self.compilers) < self.precompile_jobs and len(pending) > sum(c.point is None for c in self.compilers):
            compiler = _Child(self.context, _precompile_process, (self.settings,), duplex=True)
            self.compilers.append(compiler)
            self.log(f"started precompile process (pid {compiler.process.pid})")
        for compiler in [compiler for compiler in self.compilers if compiler.point is None]:
            if pending:
                compiler.point, compiler.since = pending.pop(0), time.monotonic()
                self.precompiled[compiler.point] = "compiling"
            try:
                compiler.receiver.send(self.points[compiler.point] if compiler.point is not None else None)
            except OSError:  # it died: its point fails below, so that every start makes progress
                pass
            if compiler.point is None:
                self.end_compiler(compiler)

    def start_points(self) -> None:
        for index in [index for index in self.waiting if self.ready(index)]:
            if len(self.running) >= self.jobs:
                return
            self.waiting.remove(index)
            child = _Child(self.context, _point_process, (self.points[index], self.settings))
            self.running[index] = child
            self.timings[index].started_s = child.started - self.begin
            self.log(f"started {self.points[index].label} (pid {child.process.pid})")

    def end_by(self, index: int) -> float:
        return min(self.running[index].started + self.points[index].timeout_s, self.deadline)

    def wait(self) -> None:
        """Until a process sends or ends, or the nearest time limit: a process must not run past its own unnoticed."""
        ends = [self.end_by(index) for index in self.running] + [self.deadline]
        ends += [compiler.since + self.points[compiler.point].timeout_s for compiler in self.compilers]
        wait_s = min(0.5, max(0.0, min(ends) - time.monotonic()))
        children = list(self.running.values()) + self.compilers
        multiprocessing.connection.wait([child.receiver for child in children], timeout=wait_s)

    def collect_compiles(self) -> None:
        for compiler in list(self.compilers):
            ended = compiler.ended()  # before reading: everything an ended process sent is read below
            for message in compiler.messages():
                index, compiler.point = compiler.point, None
                self.timings[index].precompile = {"started_s": compiler.since - self.begin} | message
                self.precompiled[index] = "failed" if "error" in message else "ready"
                outcome = f"failed ({message['error']})" if "error" in message else "done"
                self.log(f"precompile {outcome} in {message['seconds']:.1f} s: {self.points[index].label}")
                if "error" in message:  # the process ends itself after a failure
                    self.end_compiler(compiler)
            over = compiler.point is not None and time.monotonic() - compiler.since > self.points[compiler.point].timeout_s
            if compiler in self.compilers and over:
                # its own process would spend as long again: it is not run
                index = compiler.point
                self.end_compiler(compiler, "timed out")
                self.timings[index].error = f"not run: its precompile timed out after {self.points[index].timeout_s:.0f} s"
                self.waiting.remove(index)
            elif compiler in self.compilers and ended:
                self.end_compiler(compiler, f"process died: {compiler.exit_note()}")

    def end_compiler(self, compiler: _Child, why: str = "") -> None:
        """Stop a precompile process; the point it was on, if any, fails with `why`."""
        compiler.stop()
        self.compilers.remove(compiler)
        if compiler.point is not None:
            seconds = time.monotonic() - compiler.since
            self.timings[compiler.point].precompile = {"started_s": compiler.since - self.begin, "seconds": seconds,
                                                       "error": why}
            self.precompiled[compiler.point] = "failed"
            self.log(f"precompile {why} after {seconds:.0f} s: {self.points[compiler.point].label}")

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
        """The deadline: every point still running is stopped (past every time limit, `collect_points` stops them,
        keeping what they sent), every point waiting is not measured."""
        self.collect_points()
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
               precompile_jobs: int = 1) -> tuple[list[PointTiming], dict]:
    """Each point in a fresh process, `jobs` at a time, in the order given (a point that compiles once its
    precompile is done); a point that fails, crashes or runs past its `timeout_s` becomes a timing
    with that error, one still running or not started when `budget_s` is spent one that says it was not measured.
    Returns the timings and where the time went (`_SuiteRun.summary`).

    The processes fork from a server that imported torch, transformers and this package once and never
    touched a GPU (multiprocessing's forkserver): each starts in milliseconds with a CUDA context of its own;
    `start_method="spawn"` starts each from scratch instead (seconds of imports per point). `compile=False` runs
    torch.compile and flex attention uncompiled (a dry run checks that every point builds, runs and reports,
    not what code generation makes of it). `compile_cache`: the folder every process compiles into (default:
    inductor's own); `precompile_jobs`: precompile processes at a time (0: each point compiles in its own)."""
    if start_method not in START_METHODS:
        raise ValueError(f"start_method={start_method!r} is not supported; allowed values are {list(START_METHODS)}.")
    if jobs < 1 or precompile_jobs < 0:
        raise ValueError(f"jobs={jobs} must be ≥ 1 and precompile_jobs={precompile_jobs} ≥ 0.")
    # torch's CUDA check through NVML leaves the driver uninitialised in the server the processes fork from.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
    settings = {"device": device, "amp": amp, "warmup": warmup, "rounds": rounds, "compile": compile,
                # on a CPU the processes running at once share its cores
                "threads": max(1, (os.cpu_count() or 1) // (jobs + precompile_jobs)),
                # the precompile processes' compile workers share the cores a point process leaves
                "compile_threads": max(1, ((os.cpu_count() or 1) - jobs) // max(precompile_jobs, 1)),
                "environment": compile_environment(compile_cache) if compile_cache else {}}
    suite = _SuiteRun(points, settings, jobs, budget_s, precompile_jobs, context, log)
    timings = suite.run()
    return timings, suite.summary()
