"""``magdr-guard``: the command line of DESIGN §8.

::

    magdr-guard run --config FILE [--validate-config]
    magdr-guard process INPUT... --out DIR [--config FILE] [--no-guard]
    magdr-guard demo [--out DIR]
    magdr-guard calibrate ...
    magdr-guard bench ...
    magdr-guard attack INPUT... --out DIR [--method pgd|ifgsm|cw|adaptive] [--eps 0.05] [--eot 4]
    magdr-guard --validate-config [FILE]    magdr-guard --version

Human output of ``process``/``demo`` goes through :func:`daemon.logging.say`; everything else is
structlog (JSON lines when not on a TTY).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon import logging as dlog
from daemon.attack import attack_file, attack_name, report_name
from daemon.config import (
    SYSTEM_CONFIG,
    Config,
    ConfigError,
    DaemonConfig,
    FolderSinkConfig,
    FolderSourceConfig,
    load_config,
)

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_CLIP = ASSETS / "demo.mp4"


def _base_config(args: argparse.Namespace) -> Config:
    """The config for one-shot commands: ``--config`` or the documented defaults, + overrides."""
    cfg = load_config(args.config) if getattr(args, "config", None) else Config()
    if getattr(args, "generator", None):
        cfg.model.generator = (
            str(Path(args.generator).resolve()) if Path(args.generator).exists() else args.generator
        )
    if getattr(args, "no_guard", False):
        cfg.guard.enabled = False
    if getattr(args, "device", None):
        cfg.model.device = args.device
    if getattr(args, "faces", None):
        cfg.guard.faces = args.faces
    if getattr(args, "parser", None):
        cfg.model.parser = args.parser
    if getattr(args, "profile", None):
        cfg.model.profile = args.profile
    if getattr(args, "threads", None):
        cfg.model.threads = args.threads
    return cfg


def _quiet_logs(args: argparse.Namespace, cfg: Config | None = None) -> None:
    level = "info" if getattr(args, "verbose", False) else "warning"
    dlog.configure(level, cfg.logging.format if cfg else "auto", stream="stderr")


def _load_or_say(load: Callable[[], Config]) -> Config | None:
    """``load()``, or None after one line on stderr naming the bad key (the caller exits 2)."""
    try:
        return load()
    except ConfigError as e:
        dlog.say(f"magdr-guard: config error: {e}", file=sys.stderr)
        return None


def _one_shot_config(args: argparse.Namespace) -> Config | None:
    """The config of ``process``/``attack``/``demo``, quiet logs set up; None on a bad config."""
    cfg = _load_or_say(lambda: _base_config(args))
    if cfg is not None:
        _quiet_logs(args, cfg)
    return cfg


# ---- run ------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """The daemon."""
    cfg = _load_or_say(lambda: load_config(args.config))
    if cfg is None:
        return 2
    if args.validate_config:
        dlog.say(f"{args.config}: OK")
        return 0
    dlog.configure(cfg.logging.level, cfg.logging.format)
    import structlog

    from daemon.service import Service

    try:
        return Service(cfg).run()
    except Exception as e:  # start-up failures: one clear line, then systemd's restart policy
        structlog.get_logger().exception("start-up failed", error=f"{type(e).__name__}: {e}")
        return 1


def cmd_validate(path: str) -> int:  # noqa: D103
    if _load_or_say(lambda: load_config(path)) is None:
        return 2
    dlog.say(f"{path}: OK")
    return 0


# ---- process --------------------------------------------------------------------------------
def _unique_stem(stem: str, used: set[str]) -> str:
    name, n = stem, 0
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


def process_paths(
    cfg: Config, inputs: Sequence[Path], out: Path, bars: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Guard files into ``out`` like a folder sink; failures to ``out/failed``.

    Returns:
        ``(summaries, failures)``.
    """
    import json

    from tqdm import tqdm

    from daemon import media
    from daemon.metrics import Metrics
    from daemon.pipeline import frames_in_flight, process_file
    from daemon.ray_engine import EngineError
    from daemon.service import build_pipeline

    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.part"):
        tmp.unlink()
    sink = next((s for s in cfg.sinks if s.kind == "folder"), FolderSinkConfig(path=str(out)))
    metrics = Metrics()
    _, _, pipeline = build_pipeline(cfg, metrics)
    summaries, failures, used = [], [], set()
    try:
        for src in inputs:
            name = _unique_stem(src.stem, used)
            total = 0
            try:
                total = media.probe(src).frames if src.is_file() else 0
            except media.MediaError:
                pass
            bar = tqdm(
                total=total or None,
                desc=src.name,
                unit="frame",
                disable=not bars,
                file=sys.stderr,
                leave=True,
            )
            try:
                with dlog.bound(file=src.name):
                    s = process_file(
                        src,
                        name,
                        out,
                        pipeline,
                        codec=sink.codec,
                        crf=sink.crf,
                        max_pixels=cfg.guard.max_frame_pixels,
                        window=frames_in_flight(cfg),
                        progress=lambda n, b=bar: b.update(n - b.n),
                    )
                summaries.append(s)
            except EngineError:
                raise  # no guard left for any file: stop with the error, fail no file
            except Exception as e:
                reason = getattr(e, "reason", "error")
                err = {
                    "v": 1,
                    "input": src.name,
                    "reason": reason,
                    "error": f"{e}" if reason != "error" else f"{type(e).__name__}: {e}",
                }
                (out / "failed").mkdir(exist_ok=True)
                media.write_bytes(
                    out / "failed" / f"{name}.error.json",
                    (json.dumps(err, indent=2) + "\n").encode(),
                )
                failures.append(err)
            finally:
                bar.close()
    finally:
        pipeline.close()
    return summaries, failures


def _report(summaries: list[dict[str, Any]], failures: list[dict[str, Any]], out: Path) -> None:
    for s in summaries:
        score = "-" if s["max_score"] is None else f"{s['max_score']:.3f}"
        thr = "-" if s["threshold"] is None else f"{s['threshold']:.3f}"
        purified = s.get("purified_faces")
        by_purifier = f"; {purified} cleaned by the purifier" if purified else ""
        dlog.say(
            f"  {s['input']}: {s['frames']} frames, {s['faces']} faces, "
            f"{s['disrupted_faces']} disrupted (max score {score}, threshold {thr}{by_purifier}), "
            f"{s['fps']} frames/s -> {out / s['outputs']['media']}"
        )
    for f in failures:
        dlog.say(f"  {f['input']}: FAILED ({f['reason']}): {f['error']} -> {out / 'failed'}")


def cmd_process(args: argparse.Namespace) -> int:
    """One-shot: guard files, same outputs as a folder sink."""
    cfg = _one_shot_config(args)
    if cfg is None:
        return 2
    out = Path(args.out)
    summaries, failures = process_paths(
        cfg, [Path(p) for p in args.inputs], out, bars=not args.no_progress
    )
    _report(summaries, failures, out)
    return 1 if failures else 0


# ---- attack ---------------------------------------------------------------------------------
def cmd_attack(args: argparse.Namespace) -> int:
    """Disrupted copies for red-team tests, and what of them survives the daemon's crop."""
    cfg = _one_shot_config(args)
    if cfg is None:
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report and len(args.inputs) > 1:
        dlog.say("magdr-guard attack: --report takes one INPUT", file=sys.stderr)
        return 2
    rc = 0
    for p in map(Path, args.inputs):
        dst = out / attack_name(p)
        report = Path(args.report) if args.report else report_name(dst)
        t0 = time.monotonic()
        try:
            r = attack_file(cfg, p, dst, args.method, args.eps, args.steps, args.seed,
                            args.frames, args.eot, report)  # fmt: skip
        except Exception as e:
            dlog.say(f"  {p.name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
            continue
        lossless = "" if r.lossless else "; NOT LOSSLESS"
        dlog.say(
            f"  {p.name}: {r.summary()} ({args.method}, eps {args.eps}, {args.steps} steps, "
            f"{time.monotonic() - t0:.1f} s{lossless}) -> {dst}, {report}"
        )
    return rc


# ---- calibrate, bench ----------------------------------------------------------------------
#: Subcommands that hand every argument (``--help`` included) to another module's ``main(argv)``.
#: ``calibrate`` adds ``--videos DIR`` (video I/O is the daemon's) before ``magdr.calibrate``.
PASS_THROUGH = {"calibrate": "daemon.face_crops:calibrate_main", "bench": "bench.__main__:main"}


def cmd_pass_through(args: argparse.Namespace) -> int:
    """``magdr-guard calibrate|bench ...``: the module's own command line, unchanged."""
    from importlib import import_module

    module, _, fn = PASS_THROUGH[args.cmd].partition(":")
    return int(getattr(import_module(module), fn)(args.rest) or 0)


# ---- demo -----------------------------------------------------------------------------------
def _finished(outbox: Path, failed: Path) -> list[dict[str, Any]]:
    """Summaries in the outbox and error reports in failed/ (each names its ``input``)."""
    import json

    out = []
    for p in sorted(outbox.glob("*.summary.json")) + sorted(failed.glob("*.error.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass  # being written: renamed into place only when complete, so rare
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """The bundled clip and a disrupted copy through the real daemon path."""
    cfg = _one_shot_config(args)
    if cfg is None:
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="magdr-demo-")).resolve()
    if out.exists() and any(out.iterdir()):
        dlog.say(
            f"magdr-guard demo: {out} is not empty; pass an empty or new --out", file=sys.stderr
        )
        return 2
    inbox, outbox, state = out / "inbox", out / "outbox", out / "state"
    staging = out / "staging"
    for d in (staging, inbox):
        d.mkdir(parents=True, exist_ok=True)
    clip = Path(args.clip) if args.clip else DEMO_CLIP
    dlog.say(
        f"magdr-guard demo: {clip.name} and a PGD-disrupted copy "
        f"({args.attack_frames or 'all'} frames attacked) through "
        f"inbox -> guard -> outbox in {out}"
    )
    adv = staging / attack_name(clip)
    t0 = time.monotonic()
    report = out / f"{adv.name}.report.jsonl"
    # PGD through the daemon's own framing, as `magdr-guard attack` makes it: the perturbation
    # survives the daemon cropping the written frame again.
    r = attack_file(_base_config(args), clip, adv, "pgd", args.eps, args.steps,
                    frames=args.attack_frames, report=report)  # fmt: skip
    dlog.say(f"  {r.summary()} in {time.monotonic() - t0:.1f} s -> {adv.name}")
    shutil.copy2(clip, staging / clip.name)
    cfg.sources = [FolderSourceConfig(path=str(inbox), stable_s=0.2)]
    cfg.sinks = [FolderSinkConfig(path=str(outbox))]
    cfg.daemon = DaemonConfig(work_dir=str(state), rescan_s=1.0, watchdog=False)
    names = [clip.name, adv.name]
    from daemon.notify import Notifier
    from daemon.service import Service

    svc = Service(cfg, Notifier(env={}))
    t0 = time.monotonic()
    try:
        svc.start()
        for nm in names:  # moved in, like a well-behaved uploader
            (staging / nm).rename(inbox / nm)
        while not svc.stop_event.wait(0.2):
            if (
                len(_finished(outbox, out / "failed")) >= len(names)
                or time.monotonic() - t0 > args.timeout
            ):
                break
    finally:
        svc.stop()
    done = _finished(outbox, out / "failed")
    summaries = [d for d in done if "frames" in d]
    failures = [d for d in done if "reason" in d]
    dlog.say(f"  guarded in {time.monotonic() - t0:.1f} s:")
    _report(summaries, failures, outbox)
    dlog.say(
        f"  outputs: {outbox}  (NAME.mp4/.mkv cleaned video, NAME.verdicts.jsonl per frame, "
        "NAME.summary.json)"
    )
    return 0 if len(summaries) == len(names) else 1


# ---- parser ---------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config ([model] and [guard] are used)")
    p.add_argument("--generator", help="checkpoint path or 'default' (overrides [model])")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--faces", choices=["detect", "frame"], help="overrides [guard] faces")
    p.add_argument("--parser", help="overrides [model] parser")
    p.add_argument("--profile", help="overrides [model] profile")
    p.add_argument("--threads", type=int, help="torch CPU threads (overrides [model] threads)")
    p.add_argument("-v", "--verbose", action="store_true", help="info-level logs on stderr")


def build_parser() -> argparse.ArgumentParser:  # noqa: D103
    ap = argparse.ArgumentParser(
        prog="magdr-guard",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"magdr-guard {__version__}")
    ap.add_argument(
        "--validate-config",
        nargs="?",
        const=str(SYSTEM_CONFIG),
        metavar="FILE",
        help="check a config file and exit (2 and the key path on error)",
    )
    sub = ap.add_subparsers(dest="cmd")

    p = sub.add_parser("run", help="the daemon (systemd runs this)")
    p.add_argument("--config", default=str(SYSTEM_CONFIG))
    p.add_argument("--validate-config", action="store_true", help="check the config and exit")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("process", help="guard files once, with a progress bar per file")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--no-guard", action="store_true", help="plain G, no detection")
    p.add_argument("--no-progress", action="store_true")
    _model_args(p)
    p.set_defaults(fn=cmd_process)

    p = sub.add_parser("demo", help="fresh-machine demo on the bundled clip")
    p.add_argument("--out", metavar="DIR", help="where to put inbox/outbox (default: a temp dir)")
    p.add_argument("--clip", help=argparse.SUPPRESS)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--attack-frames",
        type=int,
        default=3,
        help="frames of the copy to attack (0 = all); reconstruction is slow on a CPU",
    )
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--no-guard", action="store_true", help=argparse.SUPPRESS)
    _model_args(p)
    p.set_defaults(fn=cmd_demo)

    for name, text in (
        ("calibrate", "fit thresholds and the Rec-Net profile (python -m magdr.calibrate)"),
        ("bench", "reproduce the paper's tables, write bench/results/REPORT.md (python -m bench)"),
    ):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=cmd_pass_through)

    p = sub.add_parser("attack", help="disrupted copies, for red-team tests")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--method", choices=["pgd", "ifgsm", "cw", "adaptive"], default="pgd")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--frames",
        type=int,
        default=0,
        help="attack only this many frames, spread evenly (0 = every frame)",
    )
    p.add_argument(
        "--eot",
        type=int,
        default=4,
        help="pgd/ifgsm: framings sampled per step (landmark jitter; the first one unmoved)",
    )
    p.add_argument(
        "--report",
        metavar="PATH",
        help="per-frame JSON lines (default: OUTPUT.report.jsonl beside the copy)",
    )
    _model_args(p)
    p.set_defaults(fn=cmd_attack)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``magdr-guard`` console script."""
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in PASS_THROUGH:  # their options (--help too) are the module's
        return cmd_pass_through(argparse.Namespace(cmd=argv[0], rest=argv[1:]))
    args = ap.parse_args(argv)
    if args.cmd is None:
        if args.validate_config:
            return cmd_validate(args.validate_config)
        ap.print_help(sys.stderr)
        return 2
    if args.cmd == "run":
        return int(args.fn(args))
    from daemon.ray_engine import EngineError

    try:
        return int(args.fn(args))
    except (FileNotFoundError, ValueError, KeyError) as e:
        # missing weights, a checkpoint that does not load, an unknown attribute: one line
        dlog.say(f"magdr-guard {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except EngineError as e:  # [engine] backend = "ray": Ray unreachable, or gone mid-way
        dlog.say(f"magdr-guard {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
