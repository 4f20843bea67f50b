"""`crystalscope monitor` and `serve`: watching a batch, serving the model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from crystalscope.cli.app import app
from crystalscope.cli.options import HostOption, PortOption, TokenOption
from crystalscope.console import err, out, progress_bar
from crystalscope.errors import UserError
from crystalscope.monitor.frames import DEFAULT_TIME_PATTERN

if TYPE_CHECKING:
    pass

@app.command(epilog="Example: crystalscope monitor runs/demo batches/pg-batch --positive pg "
                    "--out monitor/  (live: add --watch)")
def monitor(
    model: Annotated[Path, typer.Argument(help="Run directory or model.onnx.")],
    stream: Annotated[Path, typer.Argument(
        help="Folder of time folders (t0001/ …) or a CSV of time,path.")],
    positive: Annotated[str, typer.Option(
        help="The impurity class to watch, e.g. pg.")] = "",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the outputs.")]
    = Path("monitor"),
    false_positive_rate: Annotated[float | None, typer.Option(
        help="The model's rate of false impurity calls (default: measured with --calibrate, "
             "else from the run's test report; upper 95% bound).")] = None,
    calibrate: Annotated[Path | None, typer.Option(
        help="A known-clean stream (no impurity) to measure the false-positive rate on.")]
    = None,
    alpha: Annotated[float, typer.Option(
        help="Significance of one window (one-sided binomial test).")] = 1e-3,
    consecutive: Annotated[int, typer.Option(
        help="Significant windows in a row that raise the alarm.")] = 2,
    watch_mode: Annotated[bool, typer.Option(
        "--watch", help="Follow the folder as the probe writes it (Ctrl-C stops).")] = False,
    poll: Annotated[float, typer.Option(help="--watch: seconds between looks.")] = 1.0,
    settle: Annotated[float, typer.Option(
        help="--watch: a window is complete when unchanged this long (or a later one "
             "exists).")] = 5.0,
    stop_when_idle: Annotated[float | None, typer.Option(
        help="--watch: stop after this many seconds without a new window.")] = None,
    time_from: Annotated[str, typer.Option(
        help="folders (time folders or a CSV), name (a timestamp in each file name) or mtime "
             "(file times), for a flat folder of crops.")] = "folders",
    time_pattern: Annotated[str, typer.Option(
        help="--time-from name: regular expression whose first group is the time.")]
    = DEFAULT_TIME_PATTERN,
    window_seconds: Annotated[float, typer.Option(
        help="--time-from name|mtime: window length in seconds.")] = 60.0,
    frames: Annotated[bool, typer.Option(
        "--frames", help="STREAM holds full probe frames: cut them into crops first.")]
    = False,
    cut: Annotated[str, typer.Option(
        help="--frames: particles (segmented bright particles; measured better) or tiles "
             "(the whole frame in crop-sized squares).")] = "particles",
    crop_size: Annotated[int, typer.Option(
        help="--frames: crop side in the frame's pixels (the crops the model learnt).")]
    = 151,
    on_alarm: Annotated[str | None, typer.Option(
        help="Command to run when the alarm fires (evidence in $CRYSTALSCOPE_ALARM).")]
    = None,
    post: Annotated[str | None, typer.Option(
        help="URL to POST the alarm's evidence to (JSON).")] = None,
) -> int:
    """Impurity share per time window, with a 95% interval and an alarm that accounts for the
    model's own false positives; writes trend.csv, events.jsonl, timeline.png.

    Exit code 3 when the alarm fired (so scripts can act), 0 when it did not.
    """
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.monitor.run import Monitor, build_alarm_rule, replay, watch

    if not positive:
        raise UserError("give --positive CLASS: the impurity to watch (e.g. --positive pg)")
    predictor = load_predictor(model)
    from crystalscope.monitor.run import FrameCutting

    if cut not in ("tiles", "particles") or crop_size < 8:
        raise UserError(f"--cut {cut} / --crop-size {crop_size}: use tiles or particles, and "
                        "a crop side of at least 8 pixels")
    cutting = FrameCutting(crop_size, cut) if frames else None  # type: ignore[arg-type]
    rule = build_alarm_rule(predictor, Path(model), positive,
                            false_positive_rate=false_positive_rate, clean_stream=calibrate,
                            cutting=cutting, alpha=alpha, consecutive=consecutive)
    err.print(f"alarm rule: {consecutive} window(s) in a row with P(this many {positive} calls "
              f"| false-positive rate {rule.false_positive_rate:.4f}) < {alpha:g}; rate: "
              f"{rule.source}", highlight=False, markup=False)
    runner = Monitor(predictor, rule, out_dir, on_alarm=on_alarm, post_url=post,
                     cutting=cutting)
    if watch_mode:
        if not stream.is_dir():
            raise UserError(f"--watch {stream}: give the folder the probe writes time folders to")
        result = watch(runner, stream, poll_s=poll, settle_s=settle, idle_stop_s=stop_when_idle)
    else:
        with progress_bar() as progress:
            task = progress.add_task("monitor", total=None)
            result = replay(runner, stream, progress=lambda n: progress.advance(task, n),
                            time_from=time_from, pattern=time_pattern,
                            window_seconds=window_seconds)
    per_second = result.seconds or float("inf")
    rate_text = (f"{result.images / per_second:.1f} frames/s, {result.crops / per_second:.0f} "
                 "crops/s" if frames else f"{result.crops / per_second:.0f} crops/s")
    counted = (f"{result.images} frames, {result.crops} crops" if frames
               else f"{result.crops} crops")
    out.print(f"{len(result.windows)} windows, {counted} ({rate_text}); "
              + (f"alarm at window {result.alarm.index} ({result.alarm.time})" if result.alarm
                 else "no alarm"))
    out.print(f"wrote {', '.join(result.files)} to {out_dir}")
    return 3 if result.alarm else 0




@app.command(epilog="Example: crystalscope serve runs/demo --store crystals.lance --port 8000  "
                    "then open http://127.0.0.1:8000/")
def serve(
    model: Annotated[Path, typer.Argument(help="Run directory or model.onnx.")],
    store: Annotated[str | None, typer.Option(help="Vector store for /similar.")] = None,
    monitor_stream: Annotated[Path | None, typer.Option(
        "--monitor", help="Follow this stream folder (as monitor --watch) for /monitor.")]
    = None,
    positive: Annotated[str, typer.Option(help="--monitor: the impurity class.")] = "",
    false_positive_rate: Annotated[float | None, typer.Option(
        help="--monitor: the model's false impurity rate (default: from the run's report).")]
    = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    token: TokenOption = None,
) -> None:
    """The model behind HTTP: /predict, /similar, /model, /monitor, /health, /docs, and a
    dashboard page at / (drop images, see classes and similar crystals, follow a batch)."""
    import uvicorn

    from crystalscope.infer.predictor import load_predictor
    from crystalscope.serve.app import ServeSettings, create_app
    from crystalscope.serve.server import LOOPBACK
    from crystalscope.vectors.backends import open_store

    if host not in LOOPBACK and not token:
        err.print(f"[yellow]serving on {host} without a token: anyone who reaches it can use "
                  "it (give --token)[/yellow]")
    predictor = load_predictor(model)
    settings = ServeSettings(predictor=predictor, token=token,
                             store=open_store(store) if store else None)
    if monitor_stream is not None:
        from crystalscope.monitor.run import watch_in_background

        if not positive:
            raise UserError("--monitor needs --positive CLASS (the impurity)")
        settings.monitor = watch_in_background(predictor, Path(model), monitor_stream, positive,
                                               false_positive_rate=false_positive_rate)
    err.print(f"dashboard: http://{host}:{port}/   API docs: http://{host}:{port}/docs")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
