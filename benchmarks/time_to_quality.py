"""Quality per minute of training: runs recipes for the same minutes, then draws KID against minutes.

    python benchmarks/time_to_quality.py --data-root data --minutes 20 \
        --run "original: --recipe original" --run "improved: --recipe improved"

Each run is `NAME: sd_train.py flags`, trained with the flowers64 preset (unless its flags name
another --preset) for --minutes of training steps (sd_train.py --max-minutes: the steps that many
minutes come to at the rate of its first steps) into OUT_DIR/NAME, with the training-time KID probe
every --eval-every epochs. Runs go one after another, each in its own process, so each has the
machine to itself; a run already in OUT_DIR continues where it stopped (the same command resumes
an interrupted study). The figure (default docs/time_to_quality.png) shows each run's probe KID
[efficientnet-lite0] against its minutes of training steps (bars: one standard error over its
samples); --final-eval scores each run's last.pt with sd_eval.py (1000 samples; with
--class-fidelity for a class-conditional run).
"""

import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.checkpoint import read_checkpoint
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.run_folder import read_log
from lib.schedule import total_steps

ROOT = Path(__file__).resolve().parents[1]


def parse_run(spec):
    """'NAME: flags' -> (NAME, [flags])."""
    name, sep, flags = spec.partition(":")
    if not sep or not name.strip() or "/" in name:
        raise UserError(f"--run {spec!r}: write it as 'NAME: sd_train.py flags' (NAME without '/')")
    return name.strip(), shlex.split(flags)


def train(name, flags, args):
    """Train (or continue) one run to --minutes of training steps."""
    out = Path(args.out_dir) / name
    if (out / "last.pt").is_file():
        argv = ["--resume", str(out / "last.pt"), "--max-minutes", str(args.minutes)]
        state = read_checkpoint(out / "last.pt")["train"]
        budget = total_steps(None, args.minutes, state.get("budget_rate"))
        if budget is not None and state["global_step"] >= budget:
            print(f"{name}: {args.minutes:g} minutes trained already ({budget} steps)")
            return
    else:
        common = ["--preset", "flowers64", "--data-root", args.data_root, "--out-dir", str(out)]
        common += [
            "--max-minutes",
            str(args.minutes),
            "--epochs",
            "100000",
            "--eval-every",
            str(args.eval_every),
        ]
        common += ["--cache-dir", args.cache_dir, "--sample-every", str(args.eval_every)]
        argv = [*common, *flags]
    print(f"{name}: sd_train.py {shlex.join(argv)}", flush=True)
    # Its own process: seeds, signal handlers and allocator settings never leak into the next run.
    status = subprocess.run([sys.executable, str(ROOT / "sd_train.py"), *argv]).returncode
    if status != 0:
        raise UserError(f"{name}: sd_train.py stopped with status {status}")


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
    check_at_least(args, eval_every=1)
    if not args.minutes > 0:
        raise UserError(f"--minutes must be > 0, got {args.minutes}")
    for name, flags in runs:
        train(name, flags, args)
    draw([name for name, _ in runs], args)
    for i, (name, _) in enumerate(runs if args.final_eval else []):
        print(f"{name}: final scores", flush=True)
        checkpoint = str(Path(args.out_dir) / name / "last.pt")
        extra = ["--floor"] if i == 0 else []  # real against real: the same for every run
        if read_checkpoint(checkpoint)["config"].get("num_classes"):
            extra.append("--class-fidelity")  # how often its samples are of the kind asked for
        argv = ["--checkpoint", checkpoint, "--data-root", args.data_root, "--cache-dir", args.cache_dir]
        subprocess.run([sys.executable, str(ROOT / "sd_eval.py"), *argv, *extra], check=True)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="'NAME: sd_train.py flags' (repeat)")
    p.add_argument("--minutes", type=float, default=20.0, help="minutes of training steps per run")
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument("--out-dir", default="runs/time_to_quality", help="one folder per run inside")
    p.add_argument("--eval-every", type=int, default=2, help="epochs between KID probes")
    p.add_argument("--cache-dir", default="cache", help="decoded images and features, shared by the runs")
    p.add_argument("--figure", default="docs/time_to_quality.png", help="where the figure goes")
    p.add_argument("--final-eval", action="store_true", help="score each last.pt with sd_eval.py at the end")
    return run_cli(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
