"""``python -m bench.scaling``: frames/s of ``magdr-guard process`` as the guard scales out on Ray.

One clip of ``--frames`` frames (the bundled demo clip looped: a real face in every frame) is
guarded by :func:`daemon.cli.process_paths` (the ``process`` command's own code) with the shipped
models and the default ``[guard]`` settings, for each setting: the local backend, then
``[engine] backend = "ray"`` with each replica count of ``--replicas`` on a Ray instance started
on this machine (``address = ""``); ``--repeats`` rounds, interleaved, and the median reported
(on a shared machine single runs differ by tens of percent). Each replica and the local engine
get ``--threads`` torch threads; on a GPU (``--device cuda``) each replica gets ``--num-gpus``
of one GPU. frames/s is the summary's own figure (decode to commit, models and Ray already
started). The result goes to ``<out>/scaling.json`` and, as the "Scale-out" subsection of the
throughput section, into ``<out>/REPORT.md`` (``python -m bench`` keeps that subsection when it
rewrites the report: it hands :func:`saved_section` to ``bench.report.write``).

    python -m bench.scaling --frames 200 --replicas 1,2 --threads 1 --repeats 3
    python -m bench.scaling --device cuda --replicas 1,4 --num-gpus 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HEADING = "### Scale-out"


def loop_clip(src: Path, dst: Path, frames: int) -> None:
    """``src`` played again and again until ``frames`` frames, at its own rate."""
    from daemon import media

    writer = media.VideoWriter(dst, media.probe(src), "libx264", 18, None)
    n = 0
    try:
        while n < frames:
            for f in media.decode(src, 4096 * 4096):
                if n == frames:
                    break
                writer.write(f.image, None)  # None: the next frame's time at the clip's rate
                n += 1
        writer.close(commit=True)
    except BaseException:
        writer.close(commit=False)
        raise


def run_one(clip: Path, backend: str, replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    """Guard ``clip`` once with the given backend; frames/s and the workers seen."""
    from daemon.cli import process_paths
    from daemon.config import Config

    cfg = Config()
    cfg.model.device, cfg.model.threads = args.device, args.threads
    cfg.engine.backend, cfg.engine.replicas = backend, replicas
    cfg.engine.num_gpus = args.num_gpus if args.device.startswith("cuda") else 0.0
    with tempfile.TemporaryDirectory() as out:
        t0 = time.monotonic()
        (summary,), failures = process_paths(cfg, [clip], Path(out), bars=False)
        wall = time.monotonic() - t0
        assert not failures, failures
        verdicts = Path(out, summary["outputs"]["verdicts"]).read_text().splitlines()
        workers = {json.loads(v).get("worker") for v in verdicts} - {None}
    return {
        "backend": backend,
        "replicas": replicas if backend == "ray" else None,
        "frames": summary["frames"],
        "faces": summary["faces"],
        "fps": summary["fps"],
        "wall_s": round(wall, 1),
        "workers": len(workers),
    }


def median_run(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the median frames/s, with every trial's frames/s beside it."""
    fps = sorted(t["fps"] for t in trials)
    mid = next(t for t in trials if t["fps"] == fps[(len(fps) - 1) // 2])
    return {
        **mid,
        "fps_all": [t["fps"] for t in trials],
        "load_all": [round(t["load_avg"], 1) for t in trials if "load_avg" in t],
    }


def section(data: dict[str, Any]) -> list[str]:
    """The report's "Scale-out" subsection (Markdown lines) for a ``scaling.json``."""
    m = data["machine"]
    loads = [x for r in data["runs"] for x in r.get("load_all", [])] or [m["load_avg"][0]]
    load = (
        f"{min(loads):.1f}"
        if min(loads) == max(loads)
        else f"{min(loads):.1f} to {max(loads):.1f} over the runs"
    )
    lines = [
        HEADING,
        "",
        f"`magdr-guard process` on a {data['frames']}-frame clip (the demo clip looped, one "
        f"face per frame; default `[guard]`), `{data['device']}`, {data['threads']} torch "
        f"thread(s) per engine; {m['cpu_count']} CPUs, load average {load}; each setting "
        f"run {data.get('repeats', 1)} times, interleaved. Command: `{data['command']}` "
        f"(commit {data['commit'][:12]}).",
        "",
        "| engine | replicas | workers in verdicts | frames/s (median) | each run | "
        "ratio to 1 replica |",
        "|---|---|---|---|---|---|",
    ]
    one = next((r["fps"] for r in data["runs"] if r["replicas"] == 1), None)
    for r in data["runs"]:
        ratio = f"{r['fps'] / one:.2f}" if one and r["backend"] == "ray" else ""
        each = ", ".join(f"{f:.2f}" for f in r.get("fps_all", [r["fps"]]))
        lines.append(
            f"| {r['backend']} | {r['replicas'] or '-'} | {r['workers'] or '-'} | "
            f"{r['fps']:.2f} | {each} | {ratio} |"
        )
    lines += [""]
    if m["load_avg"][0] > m["cpu_count"]:
        lines += [
            "The machine was shared (load average above its CPU count): more processes also "
            "win a larger share of its CPUs, so the ratios overstate what the replicas give "
            "on an idle machine.",
            "",
        ]
    if not data["device"].startswith("cuda"):
        lines += [
            "On one machine the replicas share its CPUs with the daemon's own decoding, "
            "face location and encoding.",
            "",
        ]
        lines += [
            "Fractional GPU replicas: not measured in this run (no GPU); on one: "
            "`python -m bench.scaling --device cuda --replicas 1,4 --num-gpus 0.25`.",
            "",
        ]
    return lines


def saved_section(out: Path) -> list[str]:
    """The subsection for ``<out>/scaling.json``; [] when there is none (``python -m bench``)."""
    p = out / "scaling.json"
    return section(json.loads(p.read_text())) if p.exists() else []


def write_section(report: Path, lines: list[str]) -> None:
    """Put the subsection at the end of the throughput section (replacing an older one)."""
    from bench.report import section as find_section

    text, body = report.read_text(), "\n".join(lines).rstrip("\n") + "\n\n"
    old = find_section(text, HEADING)  # up to the next "## " heading
    text = (
        text.replace(old, body, 1)
        if old
        else text.replace("## Figures\n", body + "## Figures\n", 1)
    )
    report.write_text(text)


def main(argv: list[str] | None = None) -> int:  # noqa: D103
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-gpus", type=float, default=0.25, help="GPU share per replica (cuda)")
    ap.add_argument("--no-local", action="store_true", help="skip the local-backend run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each setting, interleaved")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from bench.run_info import commit, machine
    from daemon import logging as dlog
    from daemon.cli import DEMO_CLIP

    dlog.configure("warning", "console", stream="stderr")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        loop_clip(DEMO_CLIP, clip, args.frames)
        info = machine(torch.device(args.device))
        plan = ([] if args.no_local else [("local", 1)]) + [
            ("ray", int(n)) for n in args.replicas.split(",")
        ]
        trials: dict[tuple[str, int], list[dict[str, Any]]] = {k: [] for k in plan}
        for _ in range(args.repeats):  # interleaved, so a busy spell hits every setting
            for backend, n in plan:
                r = run_one(clip, backend, n, args)
                r["load_avg"] = os.getloadavg()[0]
                trials[(backend, n)].append(r)
                print(json.dumps(r), file=sys.stderr)
        runs = [median_run(t) for t in trials.values()]
    data = {
        "command": "python -m bench.scaling " + " ".join(argv or sys.argv[1:]),
        "commit": commit(),
        "machine": info,
        "device": args.device,
        "threads": args.threads,
        "frames": args.frames,
        "repeats": args.repeats,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(data, indent=2) + "\n")
    if (args.out / "REPORT.md").exists():
        write_section(args.out / "REPORT.md", section(data))
    print("\n".join(section(data)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
