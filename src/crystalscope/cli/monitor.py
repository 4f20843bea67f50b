"""`crystalscope monitor` and `serve`: watching a batch, serving the model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from crystalscope.cli.app import app
from crystalscope.cli.options import (
    AlarmRuleName,
    AllowedHostOption,
    AlphaOption,
    Arl0Option,
    CalibrateOption,
    ConsecutiveOption,
    DispersionOption,
    FalsePositiveRateOption,
    HostOption,
    MaxConcurrencyOption,
    MinShiftOption,
    OpcUaCertOption,
    OpcUaKeyOption,
    OpcUaOption,
    OpcUaTrustOption,
    PortOption,
    RuleOption,
    TokenOption,
    TtaOption,
)
from crystalscope.console import err, out, progress_bar
from crystalscope.monitor.frames import DEFAULT_TIME_PATTERN

if TYPE_CHECKING:
    from crystalscope.monitor.opcua import OpcUaPublisher
    from crystalscope.monitor.settings import OpcUaSettings
    from crystalscope.monitor.trend import AlarmRule

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
    false_positive_rate: FalsePositiveRateOption = None,
    calibrate: CalibrateOption = None,
    rule: RuleOption = AlarmRuleName.cusum,
    arl0: Arl0Option = 10_000,
    min_shift: MinShiftOption = 0.0,
    dispersion: DispersionOption = None,
    alpha: AlphaOption = 1e-3,
    consecutive: ConsecutiveOption = 2,
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
    repeat_alarm: Annotated[int, typer.Option(
        help="Repeat a standing alarm (message, event, hooks) every this many windows until "
             "the batch ends (0: once).")] = 10,
    post_retries: Annotated[int, typer.Option(
        help="--post: tries after the first, 0.5, 1, 2 … s apart; each failure is an event.")]
    = 3,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Start over in --out (its trend.csv and events.jsonl are replaced); "
                        "without it a run on the same stream resumes where it stopped.")]
    = False,
    opcua: OpcUaOption = None,
    opcua_cert: OpcUaCertOption = None,
    opcua_key: OpcUaKeyOption = None,
    opcua_trust: OpcUaTrustOption = None,
    tta: TtaOption = None,
) -> int:
    """Impurity share per time window, with a 95% interval and an alarm that accounts for the
    model's own false calls, their spread and drift (a promised false-alarm rate); writes
    trend.csv, events.jsonl, timeline.png.

    Exit code 3 when the alarm fired (so scripts can act), 0 when it did not.
    """
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.monitor.rule_setup import build_alarm_rule
    from crystalscope.monitor.run import Monitor, replay
    from crystalscope.monitor.settings import (
        AlarmSettings,
        AlertSettings,
        FrameCutting,
        OpcUaSettings,
    )
    from crystalscope.monitor.watching import check_watched, watch

    alarm = AlarmSettings(positive=positive, false_positive_rate=false_positive_rate,
                          calibrate=calibrate, rule=rule.value, arl0=arl0, min_shift=min_shift,
                          dispersion=dispersion, alpha=alpha, consecutive=consecutive)
    cutting = FrameCutting(crop_size=crop_size, cut=cut)
    alert = AlertSettings(on_alarm=on_alarm, post=post, repeat_alarm=repeat_alarm,
                          post_retries=post_retries)
    opcua_settings = OpcUaSettings(opcua=opcua, opcua_cert=opcua_cert, opcua_key=opcua_key,
                                   opcua_trust=opcua_trust, stream=stream)
    if watch_mode:
        check_watched(stream)
    predictor = load_predictor(model, tta=tta.value if tta else None)
    alarm_rule = build_alarm_rule(predictor, Path(model), alarm, cutting if frames else None)
    publisher = open_opcua(opcua_settings, Path(model))
    try:
        identity = {"stream": str(stream.resolve()), "model": str(Path(model).resolve()),
                    "positive": positive, "rule": alarm_rule.rule,
                    "false_positive_rate": alarm_rule.false_positive_rate,
                    "min_shift": alarm_rule.min_shift, "arl0": alarm_rule.arl0,
                    "alpha": alarm_rule.alpha, "consecutive": alarm_rule.consecutive}
        runner = Monitor(predictor, alarm_rule, out_dir, on_alarm=alert.on_alarm,
                         post_url=alert.post, cutting=cutting if frames else None,
                         publishers=[publisher] if publisher else [],
                         repeat_every=alert.repeat_alarm, post_retries=alert.post_retries,
                         identity=identity, resume=not fresh)
        say_rule(alarm_rule, runner.trend.promise())
        if watch_mode:
            result = watch(runner, stream, poll_s=poll, settle_s=settle,
                           idle_stop_s=stop_when_idle)
        else:
            with progress_bar() as progress:
                task = progress.add_task("monitor", total=None)
                result = replay(runner, stream, progress=lambda n: progress.advance(task, n),
                                time_from=time_from, pattern=time_pattern,
                                window_seconds=window_seconds)
    finally:
        if publisher is not None:
            publisher.stop()
    per_second = result.seconds or float("inf")
    rate_text = (f"{result.images / per_second:.1f} frames/s, {result.crops / per_second:.0f} "
                 "crops/s" if frames else f"{result.crops / per_second:.0f} crops/s")
    counted = (f"{result.images} frames, {result.crops} crops" if frames
               else f"{result.crops} crops")
    earlier = (f" ({result.resumed_windows} done by the earlier run; this run: {counted})"
               if result.resumed_windows else f", {counted}")
    out.print(f"{len(result.windows)} windows{earlier} ({rate_text}); "
              + (f"alarm at window {result.alarm.index} ({result.alarm.time})" if result.alarm
                 else "no alarm"))
    out.print(f"wrote {', '.join(result.files)} to {out_dir}")
    return 3 if result.alarm else 0


def open_opcua(settings: OpcUaSettings, model: Path) -> OpcUaPublisher | None:
    """The started OPC UA server for ``--opcua`` (None without it)."""
    endpoint, stream = settings.opcua, settings.stream
    if endpoint is None or stream is None:
        return None
    from crystalscope.monitor.opcua import OpcUaPublisher, OpcUaSecurity
    from crystalscope.serve.server import LOOPBACK

    security = (OpcUaSecurity(settings.opcua_cert, settings.opcua_key, settings.opcua_trust)
                if settings.opcua_cert is not None and settings.opcua_key is not None
                else None)
    model_path = model.resolve()
    run = model_path.name if model_path.is_dir() else model_path.parent.name
    publisher = OpcUaPublisher(endpoint, stream.stem or stream.name, run, security=security)
    if publisher.host not in LOOPBACK and security is None:
        err.print(f"[yellow]OPC UA on {publisher.host} without security: anyone on the "
                  "network can read it (give --opcua-cert and --opcua-key)[/yellow]")
    publisher.start()
    err.print(f"OPC UA: {endpoint}  node nsu={publisher.namespace_uri()};"
              f"s={publisher.node_prefix}AlarmActive", highlight=False, markup=False)
    return publisher


def say_rule(rule: AlarmRule, promise: str) -> None:
    """The calibration and the promise, before the first window."""
    if rule.calibration is not None:
        err.print(f"false {rule.positive} calls: {rule.calibration.describe()}",
                  highlight=False, markup=False)
    err.print(f"alarm rule: {promise}", highlight=False, markup=False)
    calibration = rule.calibration
    if (rule.rule == "cusum" and calibration is not None and calibration.measured_spread
            and 2 * calibration.drift > rule.min_shift + 0.25 * rule.false_positive_rate):
        err.print(f"[yellow]the clean stream's share drifts, by at least +-"
                  f"{2 * calibration.drift:.4f} (2 sd) beyond its short-term spread; give "
                  "--min-shift the largest slow drift a clean batch shows (a short calibration "
                  "sees only part of it), or the alarm will answer drift too[/yellow]")




@app.command(epilog="Example: crystalscope serve runs/demo --store crystals.lance --port 8000  "
                    "then open http://127.0.0.1:8000/")
def serve(
    model: Annotated[Path, typer.Argument(help="Run directory or model.onnx.")],
    store: Annotated[str | None, typer.Option(help="Vector store for /similar.")] = None,
    monitor_stream: Annotated[Path | None, typer.Option(
        "--monitor", help="Follow this stream folder (as monitor --watch) for /monitor and "
                          "the dashboard's trend; the alarm options are monitor's.")]
    = None,
    positive: Annotated[str, typer.Option(help="--monitor: the impurity class.")] = "",
    false_positive_rate: FalsePositiveRateOption = None,
    calibrate: CalibrateOption = None,
    rule: RuleOption = AlarmRuleName.cusum,
    arl0: Arl0Option = 10_000,
    min_shift: MinShiftOption = 0.0,
    dispersion: DispersionOption = None,
    alpha: AlphaOption = 1e-3,
    consecutive: ConsecutiveOption = 2,
    opcua: OpcUaOption = None,
    opcua_cert: OpcUaCertOption = None,
    opcua_key: OpcUaKeyOption = None,
    opcua_trust: OpcUaTrustOption = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    token: TokenOption = None,
    allowed_host: AllowedHostOption = None,
    max_concurrency: MaxConcurrencyOption = 32,
    max_pixels: Annotated[int, typer.Option(
        min=1, help="Largest upload in pixels (width x height); larger ones get 413.")]
    = 4_000_000,
    tta: TtaOption = None,
) -> None:
    """The model behind HTTP: /predict, /similar, /model, /monitor, /health, /docs, and a
    dashboard page at / (drop images, see classes and similar crystals, follow a batch)."""
    from crystalscope.infer.predictor import load_predictor
    from crystalscope.monitor.settings import AlarmSettings, OpcUaSettings
    from crystalscope.serve.app import ServeSettings, create_app
    from crystalscope.serve.server import LOOPBACK, allowed_hosts, serve_forever, warn_hosts
    from crystalscope.vectors.backends import open_store

    opcua_settings = OpcUaSettings(opcua=opcua, opcua_cert=opcua_cert, opcua_key=opcua_key,
                                   opcua_trust=opcua_trust, stream=monitor_stream)
    alarm = None if monitor_stream is None else AlarmSettings(
        positive=positive, false_positive_rate=false_positive_rate, calibrate=calibrate,
        rule=rule.value, arl0=arl0, min_shift=min_shift, dispersion=dispersion, alpha=alpha,
        consecutive=consecutive)
    if host not in LOOPBACK and not token:
        err.print(f"[yellow]serving on {host} without a token: anyone who reaches it can use "
                  "it (give --token)[/yellow]")
    predictor = load_predictor(model, tta=tta.value if tta else None)
    for note in predictor.notes:
        err.print(f"[yellow]{note}[/yellow]")
    hosts = allowed_hosts(host, allowed_host or [])
    warn_hosts(host, hosts)
    settings = ServeSettings(predictor=predictor, token=token,
                             store=open_store(store) if store else None,
                             max_pixels=max_pixels, allowed_hosts=hosts)
    if monitor_stream is not None and alarm is not None:
        from crystalscope.monitor.rule_setup import build_alarm_rule
        from crystalscope.monitor.watching import watch_in_background

        alarm_rule = build_alarm_rule(predictor, Path(model), alarm)
        publisher = open_opcua(opcua_settings, Path(model))
        settings.monitor = watch_in_background(predictor, alarm_rule, monitor_stream,
                                               publishers=[publisher] if publisher else [])
        say_rule(alarm_rule, settings.monitor.trend.promise())
    err.print(f"dashboard: http://{host}:{port}/   API docs: http://{host}:{port}/docs")
    serve_forever(create_app(settings), host, port, max_concurrency)
