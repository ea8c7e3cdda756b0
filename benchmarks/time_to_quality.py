"""Quality per minute of training: runs recipes for the same minutes, then draws KID against minutes.

    python benchmarks/time_to_quality.py --data-root data --minutes 20 \
        --run "original: --recipe original" --run "improved: --recipe improved"

Each run is `NAME: sd_train.py flags`, trained with the flowers64 preset (unless its flags name
another --preset) into OUT_DIR/NAME for --minutes of training steps (sd_train.py --max-minutes: the
steps that many minutes come to at the rate of its first steps), or for the --max-steps its flags
give (a budget that means the same on any machine), with the training-time KID probe every
--eval-every epochs. --seeds N trains each run with training seeds 0..N-1 (NAME-s0, ...), seed by
seed. Runs go one after another, each in its own process, so each has the machine to itself; a
run already in OUT_DIR continues where it stopped (the same command resumes an interrupted study).
The figure (default docs/time_to_quality.png) shows each run's probe KID [efficientnet-lite0]
against its minutes of training steps (bars: one standard error over its samples); --final-eval
scores each run's last.pt with sd_eval.py once it is trained (1000 samples; with --class-fidelity
for a class-conditional run) and ends with a table, and with several seeds the mean ± std over them.
"""

import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.checkpoint import read_checkpoint
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.run_folder import read_log
from lib.schedule import budget_spent

ROOT = Path(__file__).resolve().parents[1]


def parse_run(spec):
    """'NAME: flags' -> (NAME, [flags])."""
    name, sep, flags = spec.partition(":")
    if not sep or not name.strip() or "/" in name:
        raise UserError(f"--run {spec!r}: write it as 'NAME: sd_train.py flags' (NAME without '/')")
    return name.strip(), shlex.split(flags)


def expand(runs, seeds):
    """With --seeds N > 1, each run once per training seed: (NAME-sK, flags + --seed K, NAME)."""
    if seeds == 1:
        return [(name, flags, name) for name, flags in runs]
    return [(f"{name}-s{k}", [*flags, "--seed", str(k)], name) for k in range(seeds) for name, flags in runs]


def train(name, flags, args):
    """Train (or continue) one run to its budget: --minutes of training steps, or the --max-steps
    its flags give."""
    out = Path(args.out_dir) / name
    by_steps = "--max-steps" in flags
    if (out / "last.pt").is_file():
        state = read_checkpoint(out / "last.pt")["train"]
        minutes = None if by_steps else args.minutes
        if budget_spent(state, state["args"].get("max_steps") if by_steps else None, minutes):
            print(f"{name}: trained already ({state['global_step']} steps)")
            return
        argv = ["--resume", str(out / "last.pt")] + ([] if by_steps else ["--max-minutes", str(args.minutes)])
    else:
        common = ["--preset", "flowers64", "--data-root", args.data_root, "--out-dir", str(out)]
        common += [] if by_steps else ["--max-minutes", str(args.minutes)]
        common += ["--epochs", "100000", "--eval-every", str(args.eval_every)]
        common += ["--cache-dir", args.cache_dir, "--sample-every", str(args.eval_every)]
        argv = [*common, *flags]
    print(f"{name}: sd_train.py {shlex.join(argv)}", flush=True)
    # Its own process: seeds, signal handlers and allocator settings never leak into the next run.
    status = run_script("sd_train.py", argv)
    if status in (130, 143):  # stopped by Ctrl-C or SIGTERM, its last.pt written: the study stops too
        raise KeyboardInterrupt
    if status != 0:
        raise UserError(f"{name}: sd_train.py stopped with status {status}")


def run_script(script, argv, stdout=None):
    """Run one of the repo's scripts in a process of its own -> its exit status. A Ctrl-C reaches
    it too (same process group), and this waits for it: sd_train.py then writes last.pt, which
    subprocess.run's kill after a quarter of a second would cut short."""
    child = subprocess.Popen([sys.executable, str(ROOT / script), *argv], stdout=stdout)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue


def sd_eval_output(name, argv):
    """Run sd_eval.py for run `name` (its output passed on) -> what it printed."""
    with tempfile.TemporaryFile("w+") as out:
        status = run_script("sd_eval.py", argv, stdout=out)
        out.seek(0)
        text = out.read()
    print(text, end="", flush=True)
    if status != 0:
        raise UserError(f"{name}: sd_eval.py stopped with status {status}")
    return text


SCORE = re.compile(r"^samples: KID \[[^]]+\] (\S+) ± (\S+)\s+FID \[[^]]+\] (\S+)", re.M)
TOP1 = re.compile(r"^samples: top-1 (\S+),", re.M)


def evaluate(name, args, floor):
    """Score a run's last.pt with sd_eval.py (its output passed on) -> dict of its numbers."""
    checkpoint = str(Path(args.out_dir) / name / "last.pt")
    extra = ["--floor"] if floor else []  # real against real: the same for every run
    if read_checkpoint(checkpoint)["config"].get("num_classes"):
        extra.append("--class-fidelity")  # how often its samples are of the kind asked for
    argv = ["--checkpoint", checkpoint, "--data-root", args.data_root, "--cache-dir", args.cache_dir]
    print(f"{name}: final scores", flush=True)
    text = sd_eval_output(name, [*argv, *extra])
    kid, kid_err, fid = map(float, SCORE.search(text).groups())
    top1 = TOP1.search(text)
    return dict(kid=kid, kid_err=kid_err, fid=fid, top1=float(top1.group(1)) if top1 else None)


def summarize(expanded, scores):
    """One row per run; with several seeds, each run's mean ± std over them."""
    print("\n| run | KID [efficientnet-lite0] | FID [efficientnet-lite0] | class top-1 |\n|---|---|---|---|")
    for name, _, _ in expanded:
        s = scores[name]
        top1 = "" if s["top1"] is None else f"{s['top1']:.3f}"
        print(f"| {name} | {s['kid']:.4f} ± {s['kid_err']:.4f} | {s['fid']:.1f} | {top1} |")
    groups = {}
    for name, _, group in expanded:
        groups.setdefault(group, []).append(scores[name])
    if all(len(g) == 1 for g in groups.values()):
        return
    print("\nOver training seeds (mean ± std of the runs; each KID's own ± is over its samples):\n")
    print("| run | seeds | KID | FID | class top-1 |\n|---|---|---|---|---|")
    for group, rows in groups.items():
        cells = []
        for key, digits in (("kid", 4), ("fid", 1), ("top1", 3)):
            values = [r[key] for r in rows if r[key] is not None]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}" if values else "")
        print(f"| {group} | {len(rows)} | {' | '.join(cells)} |")


def draw(names, args):
    """KID against cumulative minutes of training steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors  # one colour per run
    for i, name in enumerate(names):
        minutes, kids = 0.0, []
        for row in read_log(Path(args.out_dir) / name):
            minutes += float(row["seconds"]) / 60
            if row["kid"]:  # logs written before the probe kept its error have none
                kids.append((minutes, float(row["kid"]), float(row.get("kid_err") or 0)))
        if kids:
            x, y, err = zip(*kids, strict=True)
            color = colors[i % len(colors)]
            ax.errorbar(x, y, yerr=err, marker="o", markersize=3, capsize=2, label=name, color=color)
    ax.set(xlabel="minutes of training steps", ylabel="KID [efficientnet-lite0], probe", yscale="log")
    ax.set_title("Quality per minute of training")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=100)
    print(f"saved {args.figure}")


def run(args):
    runs = [parse_run(spec) for spec in args.run]
    check_at_least(args, eval_every=1, seeds=1)
    if not args.minutes > 0:
        raise UserError(f"--minutes must be > 0, got {args.minutes}")
    expanded, scores = expand(runs, args.seeds), {}
    for i, (name, flags, _) in enumerate(expanded):  # seed by seed: a study cut short stays paired
        train(name, flags, args)
        if args.final_eval:
            scores[name] = evaluate(name, args, floor=i == 0)
    draw([name for name, _, _ in expanded], args)
    if args.final_eval:
        summarize(expanded, scores)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="'NAME: sd_train.py flags' (repeat)")
    p.add_argument("--minutes", type=float, default=20.0, help="minutes of training steps per run")
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument("--out-dir", default="runs/time_to_quality", help="one folder per run inside")
    p.add_argument("--eval-every", type=int, default=2, help="epochs between KID probes")
    p.add_argument("--cache-dir", default="cache", help="decoded images and features, shared by the runs")
    p.add_argument("--figure", default="docs/time_to_quality.png", help="where the figure goes")
    p.add_argument(
        "--final-eval",
        action="store_true",
        help="score each run's last.pt with sd_eval.py once it is trained",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train each run with seeds 0..N-1 (NAME-sK); the scores' mean ± std",
    )
    return run_cli(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
