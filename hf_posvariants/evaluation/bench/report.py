"""The Markdown reports of a benchmark run: the ratios first, then every case's figures."""

from __future__ import annotations

from hf_posvariants.evaluation.report import markdown_table


def _number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def markdown_report(result: dict) -> str:
    """The report of `measurement.run_benchmark`: the setting, the ratios with their targets, every case."""
    shape = result["shape"]
    peak = result["peak_tflops"]
    intro = (
        f"Device: {result['device']} ({result['threads']} threads), torch {result['torch']}, transformers "
        f"{result['transformers']}, {result['precision']}. Shape: hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads "
        f"({shape['num_key_value_heads'] or shape['num_attention_heads']} KV), intermediate "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}, batch {shape['batch_size']}, dropout "
        f"{shape['dropout']}. Clock: {result['clock']} time. Median of {result['rounds']} interleaved rounds "
        f"after {result['warmup']} warm-up steps. Memory: {result['memory_method']}. FLOPs: counted by "
        f"FlopCounterMode; MFU against {f'{peak:g} TFLOP/s' if peak else 'no known peak (pass --peak-tflops)'}."
    )
    meets = {True: "yes", False: "no", None: "–"}
    ratios = [[r["name"], r["length"], r["task"], _times(r["value"]), r["target"], meets[r["passes"]]]
              for r in result["ratios"]]
    cases = []
    for timing in result["timings"]:
        if timing["error"]:
            cases.append([timing["label"], timing["task"], timing["length"], f"unavailable: {timing['error']}",
                          "", "", "", "", ""])
            continue
        gflops = timing["flops_per_step"] / 1e9 if timing["flops_per_step"] else None
        mfu = _percent(timing["mfu"])
        cases.append([timing["label"], timing["task"], timing["length"], f"{timing['median_ms']:.1f}",
                      f"{timing['spread_ms']:.1f}", _number(timing["peak_memory_mib"], 0), _number(gflops, 2),
                      _number(timing["achieved_tflops"], 3), mfu])
    return "\n".join([
        f"# Speed and memory: case set `{result['case_set']}`", "", intro, "", "## Ratios (measured in this run)", "",
        markdown_table(["ratio", "length", "task", "value", "target", "meets"], ratios),
        "## Every case", "",
        markdown_table(["case", "task", "length", "median ms", "spread ms", "peak MiB", "GFLOP/step", "TFLOP/s",
                        "MFU"], cases),
    ])


def kernel_markdown_report(result: dict) -> str:
    """The report of `measurement.run_kernel_benchmark`."""
    shape = result["shape"]
    intro = (
        f"Device: {result['device']} ({result['threads']} threads), torch {result['torch']}. Shape: batch "
        f"{shape['batch']} × {shape['heads']} heads × length × head dim {shape['head_dim']}, {shape['dtype']}. "
        f"Clock: {result['clock']} time; torch.utils.benchmark blocked autorange of {result['min_run_time']} s."
    )
    kernels = [[t["label"], t["length"], f"unavailable: {t['error']}", "", ""] if t["error"] else
               [t["label"], t["length"], f"{t['median_ms']:.2f}", f"{t['iqr_ms']:.2f}", t["blocks"]]
               for t in result["timings"]]
    ratios = [[r["name"], r["length"], _times(r["value"])] for r in result["ratios"]]
    return "\n".join([
        "# Attention kernels alone (forward + backward)", "", intro, "",
        markdown_table(["kernel", "length", "median ms", "IQR ms", "blocks"], kernels),
        markdown_table(["ratio", "length", "value"], ratios),
    ])


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def suite_ratio_table(result: dict) -> str:
    """The ratios of a point suite (`gpu.run_gpu_suite`): time and peak memory of each pair measured in the
    run, the MFU of each side, or why a side has no figure."""
    rows = []
    for ratio in result["ratios"]:
        errors = "; ".join(f"{side}: {ratio[side + '_error']}" for side in ("numerator", "denominator")
                           if ratio[side + "_error"])
        mfu = " / ".join(map(_percent, (ratio["numerator_mfu"], ratio["denominator_mfu"])))
        rows.append([ratio["name"], _times(ratio["time"]), _times(ratio["memory"]), mfu if mfu != " / " else "",
                     ratio["numerator"], ratio["denominator"], errors])
    return markdown_table(["ratio", "time", "peak memory", "MFU", "numerator", "denominator", "missing because"], rows)


def suite_time_summary(result: dict) -> str:
    """Where a point suite's time went: the whole against its budget, then each point's process (when it started,
    in seconds since the suite did, and its seconds by phase), the seconds its compile took in its own process (the
    first step beyond a timed one) and in a precompile process (and when that started), and what inductor's FX graph
    cache did in its process."""
    spent, budget = result["time_spent"], result["budget_s"]
    intro = (
        f"Suite {spent['seconds']:.0f} s of a {f'{budget:.0f} s' if budget else 'unbounded'} budget: point processes "
        f"{spent['point_process_s']:.0f} s ({result['jobs']} at a time), precompile processes "
        f"{spent['precompile_s']:.0f} s beside them ({result['precompile_jobs']} at a time), no point running while points waited for their compiles "
        f"{spent['idle_s']:.0f} s; {spent['not_measured_budget']} points not measured for the budget. Compile cache: "
        f"{result['compile_cache'] or 'inductor default'}."
    )
    rows = []
    for timing in result["timings"]:
        phases, cache, precompile = timing["phases"], timing["compile_cache"], timing["precompile"]
        precompiled = (f"{precompile['seconds']:.1f} from {precompile['started_s']:.0f}"
                       + (f" (failed: {precompile['error'][:60]})" if precompile.get("error") else "")
                       ) if precompile else ""
        rows.append([timing["label"], _number(timing["started_s"]), _number(timing["process_s"]),
                     _number(phases.get("build")),
                     _number(phases.get("first step")), _number(phases.get("steps")), _number(phases.get("FLOP count")),
                     _number(timing["median_ms"], 2), _number(timing["compile_s"]), precompiled,
                     f"{cache['fx_graph_hits']} / {cache['fx_graph_misses']}" if cache else "",
                     (timing["error"] or "measured")[:80]])
    return "\n".join([intro, "", markdown_table(
        ["case", "start s", "process s", "build s", "first step s", "other steps s", "FLOP count s", "step ms",
         "compile s (first step − step)", "precompile s from start s", "FX graph cache hits / misses", "outcome"],
        rows)])


def suite_markdown_report(result: dict) -> str:
    """The report of a point suite: the setting, the ratio table, where the time went, every point's figures."""
    peak = result["peak_tflops"]
    intro = (
        f"Device: {result['device']}, torch {result['torch']}, transformers {result['transformers']}, "
        f"{result['precision']}; {'compiled' if result['compile'] else 'nothing compiled (dry run)'}. Each case "
        f"in a process of its own: peak memory over its first two steps ({result['memory_method']}), then "
        f"{result['warmup']} warm-up steps, median of {result['rounds']} timed. MFU against "
        f"{f'{peak:g} TFLOP/s' if peak else 'no known peak'}. Suite time {result['seconds']:.0f} s."
    )
    points = []
    for timing in result["timings"]:
        mfu = _percent(timing["mfu"])
        note = f"failed: {timing['error']}" if timing["error"] else (
            f"{timing['per_token_ms']:.2f} ms/token" if timing["per_token_ms"] else "")
        points.append([timing["label"], _number(timing["median_ms"], 2), _number(timing["peak_memory_mib"], 0),
                       mfu, note])
    return "\n".join([
        f"# Speed and memory: case set `{result['case_set']}`", "", intro, "", "## Ratios (measured in this run)", "",
        suite_ratio_table(result), "## Where the time went", "", suite_time_summary(result), "## Every case", "",
        markdown_table(["case", "median ms", "peak MiB", "MFU", "note"], points),
    ])
