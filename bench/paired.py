"""Judge a change: this checkout against an older commit, both serving at once, in paired
alternation. On a shared VM the host moves by more than most changes (resnet50's raw
loop read 25-31 img/s in one evening), so back-to-back runs of each mislead; short
slices taken in turns, compared pair by pair, do not.

Starts ``ringserve serve`` twice (``--base`` exported with ``git archive`` into a
temporary directory, and this checkout), the same model and settings, then runs wrk
against each in turn (order flipped every round) and prints per concurrency each
side's median, the paired median ratio new / base, and the v2 statistics per request.

    python -m bench.paired --base 72fe718 --model resnet50 --concurrency 8,32 \\
        [--rounds 6] [--seconds 12] [--image photo.jpg] [--set batching.preferred_batch_size=8]

A change of settings, not of code, is judged the same way: ``--base HEAD`` and the
setting for this checkout's side alone, ``--new-set models.r50.compile=true``, or an
environment variable for it alone, ``--new-env GOMP_SPINCOUNT=300000`` (and
``--base-env`` for the base side: ``XDG_CACHE_HOME=DIR`` starts it from a profile cache
of your own; a side that keeps a larger batch size under load writes it there too, in
``served-sizes-v1.json``, and a later run from DIR starts at it: give each run a copy).

``--model digits`` serves the default model with ``--image`` (by default a 640x480
JPEG made here): a model whose forward is trivial, so decoding is the work, as with a
fast model on a GPU host. The per-stage times are each side's own definitions: where
the change redefines one (``compute_input`` counts only the wait for inputs since
``e34e6be``), compare it within a side, not across.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

from bench import run as bench_run
from bench.batch_mix import stage_ms, stats

# The served name of each model: bench.run's (identity: the serving path alone, for
# c=1 overhead) and digits, the default model.
NAMES = {**bench_run.MODEL_NAMES, "digits": "digits"}
PATHS = {model: f"/v1/models/{name}/predict" for model, name in NAMES.items()}
STAGES = ("queue", "compute_input", "compute_infer")


def package_path(tree: Path, into: Path) -> Path:
    """A directory holding ``ringserve`` as ``tree``'s pyproject maps it (symlinks), to
    put first on PYTHONPATH: that tree is then imported, not the installed checkout."""
    mapping = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, directory in sorted(mapping["package-dir"].items()):  # parents first
        target = into / Path(*package.split("."))
        if target.is_symlink():  # its parent's link to the same directory
            target.unlink()
        target.mkdir(parents=True)  # a directory of links: its subpackages go in beside
        for child in (tree / directory).iterdir():
            if child.name != "__pycache__":
                (target / child.name).symlink_to(child)
    return into


def export(rev: str, into: Path) -> Path:
    """``rev`` of this repository, importable: returns its PYTHONPATH entry."""
    tree = into / "tree"
    tree.mkdir(parents=True)
    git = ["git", "-C", str(bench_run.REPO), "archive", rev]
    archive = subprocess.run(git, capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--base {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return package_path(tree, into / "path")


def photo(path: Path) -> Path:
    """A 640x480 JPEG with some texture (a camera's frame, not a thumbnail)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1) + rng.normal(0, 20, (480, 640, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def request_body(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The body every slice sends, and its content type: ``bench.run``'s for its models
    (identity's JSON, resnet50's JPEG), a photo (or ``--image``) for digits."""
    if args.model not in bench_run.MODEL_NAMES:
        return args.image or photo(tmp / "photo.jpg"), "image/jpeg"
    key, content_type = bench_run.body_for(args.model)
    return bench_run.make_inputs(tmp / "inputs")[key], content_type


def command(port: int, args: argparse.Namespace, tmp: Path, side: str) -> list[str]:
    """resnet50 and identity as ``bench.run`` starts them (resnet50: one worker on every
    thread); digits as the default model, on ``--threads``; ``--new-set`` for the new
    side only."""
    run_args = bench_run.parse_args(["--threads", str(args.threads)])
    if args.model in bench_run.MODEL_NAMES:
        cmd = bench_run.launch_ringserve("wrk")(args.model, port, run_args, tmp).cmd
    else:
        cmd = [*bench_run.ringserve_command(port, run_args, tmp), "--threads", str(args.threads)]
    for s in args.set + (args.new_set if side == "new" else []):
        cmd += ["--set", s]
    return cmd


def side_env(args: argparse.Namespace, side: str, path: Path, tmp: Path) -> dict[str, str]:
    """The environment a side's server gets on top of ours: its package first on the
    path, its own profile cache, and ``--new-env`` or ``--base-env`` for that side."""
    inherited = os.environ.get("PYTHONPATH", "")
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(path), inherited) if p),
        "XDG_CACHE_HOME": str(tmp / f"cache-{side}"),
    }
    env.update(kv.split("=", 1) for kv in (args.new_env if side == "new" else args.base_env))
    return env


@contextlib.contextmanager
def serving(
    paths: dict[str, Path], args: argparse.Namespace, body: tuple[Path, str], tmp: Path
) -> Iterator[dict[str, tuple[str, int, int]]]:
    """Both servers, ready and warmed up: side -> (url, pid, port)."""
    servers = {}
    with contextlib.ExitStack() as stack:
        for side, path in paths.items():
            port = bench_run.free_port()
            env = side_env(args, side, path, tmp)
            launch = bench_run.Launch(
                command(port, args, tmp, side), PATHS[args.model], "", "", env
            )
            log = (args.logs or tmp) / f"server-{side}.log"
            pid = stack.enter_context(bench_run.running(launch, port, log, 300))
            servers[side] = (f"http://127.0.0.1:{port}{PATHS[args.model]}", pid, port)
            bench_run.run_wrk(args.wrk, servers[side][0], 8, 2, *body)  # warm-up
        yield servers


def one_slice(
    server: tuple[str, int, int], conc: int, args: argparse.Namespace, body: tuple[Path, str]
):
    """(p50 ms at c=1 else req/s, wrk errors, ms per request in each v2 stage)."""
    url, pid, port = server
    name = NAMES[args.model]
    bench_run.settle(bench_run.tree(pid))
    before = stats(port, name)[1]
    warmup = bench_run.WINDOW_WARMUP_S if conc > 1 else 0.0  # a rate, counted as run.py does
    w = bench_run.run_wrk(args.wrk, url, conc, args.seconds, *body, warmup)
    bench_run.settle(bench_run.tree(pid))
    ms = stage_ms(before, stats(port, name)[1])
    return (w["p50_ms"] if conc == 1 else w["throughput"]), w["errors"], ms


def report(conc: int, results: dict, sides: list[str]) -> None:
    unit, better = ("p50 ms", "below 1 is better") if conc == 1 else ("req/s", "above 1 is better")
    for side in sides:
        values = [v for v, _, _ in results[(side, conc)]]
        errors = sum(e for _, e, _ in results[(side, conc)])
        stages = ", ".join(
            f"{k} {statistics.median(ms.get(k, 0.0) for _, _, ms in results[(side, conc)]):.2f}"
            for k in STAGES
        )
        print(
            f"c={conc} {side:4s}: median {statistics.median(values):8.2f} {unit}  "
            f"({', '.join(f'{x:.1f}' for x in values)}); errors {errors}; "
            f"ms per request: {stages}"
        )
    pairs = zip(*(results[(side, conc)] for side in ("new", "base")), strict=True)
    ratios = [n[0] / b[0] for n, b in pairs if n[0] > 0 and b[0] > 0]
    if ratios:
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(
            f"c={conc} new / base, paired: median {statistics.median(ratios):.3f}, "
            f"geometric mean {geo:.3f} ({better})"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--model", default="resnet50", choices=list(PATHS))
    ap.add_argument("--concurrency", default="8")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--image",
        type=Path,
        help="the JPEG to send (digits; resnet50 and identity send bench.run's bodies)",
    )
    ap.add_argument("--set", action="append", default=[], help="passed to ringserve serve")
    ap.add_argument(
        "--new-set", action="append", default=[], help="as --set, for this checkout's side only"
    )
    ap.add_argument(
        "--new-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for this checkout's side only",
    )
    ap.add_argument(
        "--base-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the base side only (a profile cache to start "
        "from: XDG_CACHE_HOME=DIR)",
    )
    ap.add_argument(
        "--logs", type=Path, help="a directory to keep the servers' logs in (server-SIDE.log)"
    )
    args = ap.parse_args(argv)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    for option in ("new_env", "base_env"):
        if any("=" not in kv for kv in getattr(args, option)):
            ap.error(f"--{option.replace('_', '-')} takes NAME=VALUE")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.wrk = bench_run.ensure_wrk() or "wrk"
    concs = [int(c) for c in args.concurrency.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="ringserve-paired-") as tmp_dir:
        tmp = Path(tmp_dir)
        body = request_body(args, tmp)
        paths = {
            "base": export(args.base, tmp / "base"),
            "new": package_path(bench_run.REPO, tmp / "new"),
        }
        sides = list(paths)
        results: dict[tuple[str, int], list] = {(s, c): [] for s in sides for c in concs}
        with serving(paths, args, body, tmp) as servers:
            for r in range(args.rounds):
                for conc in concs:
                    for side in sides if r % 2 == 0 else sides[::-1]:
                        results[(side, conc)].append(one_slice(servers[side], conc, args, body))
    for conc in concs:
        report(conc, results, sides)
    failed = sum(e for rows in results.values() for _, e, _ in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
