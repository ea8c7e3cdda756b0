"""One training run in progress, as sd_train.py drives it epoch by epoch: the data, the LR
schedule, the random streams and the progress counters that last.pt stores and --resume restores,
and the work at each epoch's end (log, curves, sample grid, KID, checkpoints). `args` is
sd_train.py's parsed flags."""

import contextlib
import math
import time
import uuid

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from lib import distributed
from lib.bn_stats import recompute_bn_stats
from lib.checkpoint import load_weights, make_checkpoint
from lib.classes import GUIDANCE, classes_across
from lib.cli import UserError
from lib.data import DecodedBatches, JpegBatches, epoch_order, load_images, load_labelled_images
from lib.diffusion import as_noise_predictor
from lib.files import atomic_save
from lib.metrics import KidProbe
from lib.normalization import FLOWERS_MEAN, FLOWERS_STD, compute_stats, model_stats, to_model_space
from lib.run_folder import write_log
from lib.runtime import autocast, sum_dtype
from lib.sample import generate, initial_noise
from lib.schedule import fix_rate, lr_factor, progress_at, total_steps, trained_minutes, window_done
from lib.training import Training, ema_decay_at
from lib.unet import count_parameters

# With fp16 loss scaling, a step whose loss overflowed is skipped (the scaler lowers the scale and
# the weights stay as they were); this many skipped in a row means training diverged.
SKIPPED_IN_A_ROW = 20

# A new run's progress counters, as last.pt stores them. images_done / epoch_steps: progress in the
# current epoch, in images (so a run resumed with another process count knows where to continue)
# and in global steps; epoch_finite: how many of those steps had a finite loss (the ranks' mean);
# epoch_skipped: the non-finite losses, summed over the ranks.
NEW_RUN = dict(
    epoch=0,
    images_done=0,
    epoch_steps=0,
    epoch_finite=0.0,
    epoch_skipped=0,
    epoch_loss_sum=0.0,
    epoch_seconds=0.0,
    global_step=0,
    best_loss=math.inf,
    best_kid=math.inf,
    best_written=math.inf,  # best.pt's loss or KID (--best-by): the best of the epochs written
    bad_epochs=0,
    budget_rate=None,  # --max-minutes' timed rate (lib.schedule.fix_rate), once the run has timed it
)


def add_loss(acc, loss):
    """acc: [sum of the finite losses, their count, the current run of non-finite ones, the
    longest run] on the loss's device, updated without waiting for the device."""
    finite = torch.isfinite(loss)
    acc[0] += torch.where(finite, loss, 0.0)
    acc[1] += finite
    acc[2] = (acc[2] + 1) * ~finite
    acc[3] = torch.maximum(acc[3], acc[2])


def quiet(*args, **kwargs):
    """The log of ranks other than 0: one voice speaks for the run."""


class TrainingRun:
    """A run in progress: the step's objects (lib.training.Training: network, EMA, Adam), the
    data, the LR schedule, the random streams and the progress counters (`state`)."""

    def __init__(self, args, cfg, resumed, ctx, device, precision, out_dir, init=None):
        self.args, self.cfg, self.ctx, self.device, self.out_dir = args, cfg, ctx, device, out_dir
        self.log = print if ctx.is_main else quiet
        self.training = Training(
            cfg,
            device,
            precision,
            args.lr,
            literal=args.literal,
            compile=args.compile,
            distributed=ctx.active,
            sync_bn=args.sync_bn and ctx.active,
            optimizer=args.optimizer,
            weight_decay=args.weight_decay,
            objective=dict(
                loss=args.loss, min_snr_gamma=args.min_snr_gamma, prediction=cfg.get("prediction", "eps")
            ),
        )
        self.budget_done = False
        self.first_step = None  # (global step, seconds trained) after this session's first step
        kid_here = args.eval_every > 0 and ctx.is_main
        own_bn = args.ema_bn_stats == "own" and ctx.is_main
        images, labels = self.load_data(resumed or init, kid_here or own_bn)
        self.bn_images = (images, labels) if own_bn else None
        self.bn_step = None  # the step at which the EMA's own BatchNorm statistics were last computed
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.training.opt,
            mode="min",
            factor=args.lr_factor,
            patience=args.lr_patience,
            min_lr=args.min_lr,
        )
        self.gen = torch.Generator(device).manual_seed(args.seed + ctx.rank)  # times, noise, flips: per rank
        self.state = dict(NEW_RUN, log=[])
        # Which run a checkpoint belongs to, so that resuming never writes over another run's files.
        self.run_id = resumed["train"].get("run_id") if resumed else uuid.uuid4().hex
        if resumed:
            self.restore(resumed)
        elif init:  # --init-from: the network and its average both start at the checkpoint's EMA
            for net in (self.training.model, self.training.ema):
                load_weights(net, init["ema"], args.init_from)
        self.sample_noise = initial_noise(args.num_samples, cfg["image_size"], args.seed)
        self.sample_classes = {}  # a class-conditional model's grids: classes across the range, guided
        if cfg.get("num_classes"):
            self.sample_classes = dict(
                labels=classes_across(args.num_samples, cfg["num_classes"]), guidance=GUIDANCE
            )
        self.kid_probe = self.make_kid_probe(images, labels, precision) if kid_here else None

    def make_kid_probe(self, images, labels, precision):
        """The training-time KID probe of --eval-every, against the training images."""
        args = self.args
        self.log(f"KID probe: features of the {self.n_images} training images (efficientnet-lite0)")
        return KidProbe(
            images,
            self.mean,
            self.model_std,
            args.eval_samples,
            args.eval_steps,
            args.seed + 1,
            precision,
            self.device,
            args.cache_dir,
            args.sampler,
            labels,
        )

    def load_data(self, saved, keep_images):
        """Set the batch source and the normalization -> the decoded images (or None) and, for a
        class-conditional model, their labels (else None). `saved`: the checkpoint resumed or
        started from (--init-from), whose data statistics its weights were trained in and keep.

        The fast path trains on the images decoded once; the literal path decodes every epoch and
        needs them whole only for their statistics (--image-dir, --norm-stats data) or the KID
        references."""
        args, ctx, size = self.args, self.ctx, self.cfg["image_size"]
        origin = f"--image-dir {args.image_dir}" if args.image_dir else f"Flowers102 from {args.data_root}"
        self.log(f"loading images ({origin})")
        source = dict(
            data_root=args.data_root, image_dir=args.image_dir, download=args.download, limit=args.limit
        )
        images = None
        own_stats = (args.image_dir or args.norm_stats == "data") and not saved
        labels = None
        if self.cfg.get("num_classes"):
            images, labels, names = load_labelled_images(
                size, **source, num_workers=args.num_workers, cache_dir=args.cache_dir
            )
            if names != self.cfg["classes"]:
                raise UserError(
                    f"the data's classes are not the {len(self.cfg['classes'])} the run was started with"
                )
        elif not args.literal or own_stats or keep_images:
            images = load_images(size, **source, num_workers=args.num_workers, cache_dir=args.cache_dir)
        self.data = (
            JpegBatches(size, self.device, args.num_workers, **source)
            if args.literal
            else DecodedBatches(images, self.device, labels)
        )
        if saved:
            self.mean, self.std = saved["norm"]["mean"], saved["norm"]["std"]
        elif own_stats:  # the user's pictures, or --norm-stats data: the images' own statistics
            self.mean, self.std = compute_stats(images)
        else:
            self.mean, self.std = FLOWERS_MEAN, FLOWERS_STD
        # The model's space: --input-scale b (the config's) multiplies the normalized images, which
        # shifts log-SNR by 2 log b at every t (Chen 2023); norm keeps the data's own statistics.
        self.model_std = model_stats(dict(config=self.cfg, norm=dict(mean=self.mean, std=self.std)))[1]
        self.n_images = len(self.data)
        self.steps_per_epoch = steps = len(
            distributed.shard(torch.arange(self.n_images), args.batch_size, ctx)
        )
        if args.eval_every > 0 and self.n_images < 3:
            raise UserError(
                "--eval-every needs at least 3 training images (KID and its error compare two sets)"
            )
        if steps == 0:
            raise UserError(
                f"{self.n_images} image(s) make no batch for {ctx.world_size} processes: "
                "use more images or fewer processes"
            )
        self.log(
            f"{self.n_images} images of {size} px, {count_parameters(self.training.model):,} parameters, "
            f"{self.device} {self.training.precision}{' literal path' if args.literal else ''}, "
            f"{ctx.world_size} process(es) x batch {args.batch_size}, {steps} steps per epoch"
        )
        return images, labels

    def restore(self, resumed):
        """Put the run back where its checkpoint left it (weights, optimizer, schedule, RNG, progress)."""
        t, run, sched, args, ctx = resumed["train"], self.training, self.sched, self.args, self.ctx
        run.model.load_state_dict(t["model"])
        run.ema.load_state_dict(resumed["ema"])
        # Moments and step counts come back; how Adam runs (fused or not) is this run's choice: a
        # run resumed with --literal switched on or off would otherwise keep the old one (and,
        # fused under loss scaling, crash).
        for saved, now in zip(t["optimizer"]["param_groups"], run.opt.param_groups, strict=True):
            saved.update(fused=now["fused"], foreach=now["foreach"])
        run.opt.load_state_dict(t["optimizer"])
        sched.load_state_dict(t["scheduler"])
        if t["scaler"] and run.scaler.is_enabled():  # empty when the run had no loss scaling
            run.scaler.load_state_dict(t["scaler"])
        if "lr" in resumed["explicit"]:  # an explicit --lr on resume restarts the schedule there
            for group in run.opt.param_groups:
                group["lr"] = args.lr
        # The schedule's own settings come from the flags (the saved ones unless overridden now).
        sched.factor, sched.patience = args.lr_factor, args.lr_patience
        sched.min_lrs = [args.min_lr] * len(sched.min_lrs)
        torch.set_rng_state(t["rng"]["torch"])
        gen_states = t["rng"]["device"]  # one per rank of the run that wrote it
        if len(gen_states) == ctx.world_size and gen_states[ctx.rank].shape == self.gen.get_state().shape:
            self.gen.set_state(gen_states[ctx.rank])
        else:  # another process count or device type (CPU and CUDA generator states differ):
            self.gen.manual_seed(args.seed + ctx.rank + 1_000_003 * t["global_step"])  # fresh streams
        self.state.update({k: t[k] for k in self.state if k in t})
        if "epoch_finite" not in t:  # written before skipped steps were counted: none was skipped
            self.state["epoch_finite"] = float(t["epoch_steps"])
        if "best_written" not in t:  # written before --save-every: every epoch was written
            self.state["best_written"] = t["best_kid"] if args.best_by == "kid" else t["best_loss"]
        epoch, done = self.state["epoch"] + 1, self.state["images_done"]
        self.log(f"resumed {args.resume}: epoch {epoch}, {done} images into it; writing to {self.out_dir}")

    def save(self, name, own_bn=True):
        """Write out_dir/name. Collective (every rank's RNG state is gathered); rank 0 writes.
        With --ema-bn-stats own, the averaged weights get their own BatchNorm statistics first
        (own_bn=False, for a stop request: the stop stays quick, the next save computes them)."""
        ctx, run = self.ctx, self.training
        model_state, ema_state = run.model.state_dict(), run.ema.state_dict()
        weights = [t for t in (*model_state.values(), *ema_state.values()) if t.is_floating_point()]
        if distributed.any_rank(
            not torch.stack([t.isfinite().all() for t in weights]).all().item(), ctx, self.device
        ):
            raise UserError(
                f"the weights are no longer finite in epoch {self.state['epoch'] + 1}: training diverged. "
                "Nothing of it was saved (last.pt holds the state saved before); try a lower --lr"
            )
        gen_states = [self.gen.get_state()]
        if ctx.active:
            gen_states = [None] * ctx.world_size
            torch.distributed.all_gather_object(gen_states, self.gen.get_state().cpu())
        if not ctx.is_main:
            return
        if own_bn and self.bn_images is not None and self.bn_step != self.state["global_step"]:
            self.own_bn_stats()
            ema_state = run.ema.state_dict()
        train_state = dict(
            self.state,
            run_id=self.run_id,
            args=vars(self.args),
            model=model_state,
            optimizer=run.opt.state_dict(),
            scheduler=self.sched.state_dict(),
            scaler=run.scaler.state_dict(),
            world_size=ctx.world_size,
            rng={"torch": torch.get_rng_state(), "device": gen_states},
        )
        ckpt = make_checkpoint(self.cfg, self.mean, self.std, ema_state, train_state)
        atomic_save(ckpt, self.out_dir / name)

    def own_bn_stats(self):
        """The EMA network's BatchNorm statistics, recomputed under its own weights (SWA's fix,
        lib/bn_stats.py) on fixed training batches. The next step's EMA update copies the live
        statistics back in, so training (and a resume) goes on exactly as without this."""
        images, labels = self.bn_images
        with autocast(self.device, self.training.precision):
            recompute_bn_stats(
                self.training.ema,
                self.mean,
                self.model_std,
                images,
                labels,
                batch_size=min(64, len(images)),
                seed=self.args.seed,
                label_dropout=self.args.label_dropout,
            )
        self.bn_step = self.state["global_step"]

    def train_epoch(self, stop):
        """The rest of the current epoch, until its end or a stop request -> True if it reached the end."""
        args, ctx, state = self.args, self.ctx, self.state
        order = epoch_order(self.n_images, state["epoch"], args.seed)[state["images_done"] :]
        batches = distributed.shard(order, args.batch_size, ctx)  # this rank's
        global_sizes = [len(gb) for gb in order.split(args.batch_size * ctx.world_size)]
        self.training.model.train()
        # This rank's, this session (add_loss). fp64 adds fp32 losses exactly, so a run stopped and
        # resumed mid-epoch (two partial sums) reports the very loss of an uninterrupted one (with
        # one process; the division by the process count below can round each part differently).
        acc = torch.zeros(4, dtype=sum_dtype(self.device), device=self.device)
        first = state["epoch_steps"]
        bar = tqdm(
            self.data.batches(batches),
            initial=first,
            total=first + len(batches),
            leave=False,
            disable=not ctx.is_main,
            desc=f"epoch {state['epoch'] + 1}/{args.epochs}",
            dynamic_ncols=True,
        )
        # Under torchrun, asking every rank costs a device sync; every 10 steps keeps the queue full.
        check_every = 10 if ctx.active else 1
        spent, t0, steps_done = trained_minutes(state) * 60, time.perf_counter(), 0
        for i, batch in enumerate(bar):
            images, labels = batch if self.cfg.get("num_classes") else (batch, None)
            self.set_lr()
            x0 = to_model_space(images, self.mean, self.model_std, self.gen if args.flip else None)
            decay = ema_decay_at(state["global_step"], args.ema_decay, args.ema_warmup, args.ema_power)
            add_loss(acc, self.training.step(x0, self.gen, decay, labels, args.label_dropout))
            state["global_step"] += 1
            state["epoch_steps"] += 1
            state["images_done"] += global_sizes[i]
            steps_done += 1
            if i % 10 == 0:
                total, count = acc[:2].tolist()
                bar.set_postfix(
                    loss=f"{(state['epoch_loss_sum'] + total) / max(1, state['epoch_finite'] + count):.4f}"
                )
            self.time_steps(spent + time.perf_counter() - t0, (i + 1) % check_every == 0)
            self.budget_done = self.total_steps is not None and state["global_step"] >= self.total_steps
            if self.budget_done or (
                (i + 1) % check_every == 0 and distributed.any_rank(stop.requested, ctx, self.device)
            ):
                break
        state["epoch_seconds"] += time.perf_counter() - t0
        # Every rank adds the same means over the ranks, so all take the same decisions.
        total, count, _, longest_skip_run = acc.tolist()
        state["epoch_loss_sum"] += distributed.all_sum(total, ctx, self.device) / ctx.world_size
        state["epoch_finite"] += distributed.all_sum(count, ctx, self.device) / ctx.world_size
        state["epoch_skipped"] += round(distributed.all_sum(steps_done - count, ctx, self.device))
        self.skipping = distributed.any_rank(longest_skip_run >= SKIPPED_IN_A_ROW, ctx, self.device)
        bar.close()
        return steps_done == len(batches)

    def set_lr(self):
        """The coming step's LR, where the warmup or a per-step schedule sets it (lr_factor):
        a function of the step and the run's length only (lib/schedule.py). cosine and wsd run
        to the end of --epochs or of the step budget, whichever comes first. Epochs are counted
        in images, which a resume with another batch size or process count keeps."""
        args, state, step = self.args, self.state, self.state["global_step"]
        if args.lr_schedule == "plateau" and step >= args.warmup_steps:
            return  # ReduceLROnPlateau's, changed at epoch ends
        epochs_done = state["epoch"] + state["images_done"] / self.n_images
        progress = progress_at(step, epochs_done, args.epochs, self.total_steps)
        lr = args.lr * lr_factor(
            args.lr_schedule, step, args.warmup_steps, args.lr_decay_steps, progress, args.lr_cooldown
        )
        for group in self.training.opt.param_groups:
            group["lr"] = lr

    @property
    def total_steps(self):
        """The run's length in steps, where a step budget sets one and it is known (else None)."""
        return total_steps(self.args.max_steps, self.args.max_minutes, self.state["budget_rate"])

    def time_steps(self, trained_seconds, collective):
        """--max-minutes without a timed rate yet: once this session has timed enough steps after
        its first, fix the run's length in steps. Rank 0's clock decides for every rank, at a step
        where all ranks ask (`collective`). trained_seconds: the run's seconds of steps so far."""
        args, state, ctx = self.args, self.state, self.ctx
        if not args.max_minutes or args.max_steps or state["budget_rate"]:
            return
        if self.first_step is None:  # the session's first step ends: the timing starts here
            self.first_step = (state["global_step"], trained_seconds)
        if not collective:
            return
        steps, seconds = state["global_step"] - self.first_step[0], trained_seconds - self.first_step[1]
        ready = ctx.is_main and window_done(args.max_minutes, steps, seconds)
        if not distributed.any_rank(ready, ctx, self.device):
            return
        mine = fix_rate(state["global_step"], trained_seconds, steps, seconds) if ctx.is_main else {}
        rate = {
            k: distributed.all_sum(mine.get(k, 0.0), ctx, self.device)
            for k in ("seconds", "seconds_per_step")
        }
        state["budget_rate"] = dict(rate, step=state["global_step"])
        self.log(
            f"{args.max_minutes:g} minutes of training come to {self.total_steps} steps at "
            f"{rate['seconds_per_step']:.3f} s a step (timed over {steps} steps): the run's length is fixed"
        )

    def check_diverged(self, reached_end):
        """A one-line error, before anything of the epoch is saved, if training diverged: a
        non-finite loss without loss scaling (its step was taken, so the weights are gone), or
        with fp16 loss scaling (which skips such steps) SKIPPED_IN_A_ROW skipped steps in a row,
        or an epoch without one finite loss."""
        state, epoch = self.state, self.state["epoch"] + 1
        skipped = state["epoch_skipped"]
        scaled = self.training.scaler.is_enabled()
        none_finite = reached_end and state["epoch_finite"] == 0
        if (skipped and not scaled) or (scaled and (self.skipping or none_finite)):
            hint = "a lower --lr" + (", or --precision bf16 or fp32" if scaled else "")
            raise UserError(
                f"training diverged in epoch {epoch}: {skipped} of its {state['epoch_steps']} steps had a "
                f"non-finite loss. Nothing of this epoch was saved (last.pt holds the state saved before); "
                f"try {hint}"
            )

    def halt_reason(self, interrupted):
        """Why the run pauses after this part of an epoch, or "" if it goes on."""
        if interrupted:
            return "stopped"
        if not self.budget_done:
            return ""
        if self.args.max_steps:
            return f"{self.total_steps} steps done"
        return f"{self.total_steps} steps done ({self.args.max_minutes:g} minutes at the timed rate)"

    def resume_hint(self):
        flag = "--max-steps" if self.args.max_steps else "--max-minutes"
        more = f" and a larger {flag}" if self.budget_done else ""
        return f"resume with --resume {self.out_dir / 'last.pt'}{more}"

    def log_done(self):
        state = self.state
        best_kid = "" if self.kid_probe is None else f", best KID {state['best_kid']:.4f}"
        self.log(
            f"done: {state['epoch']} epoch{'s' * (state['epoch'] != 1)}, best loss {state['best_loss']:.4f}"
            f"{best_kid}; {trained_minutes(state):.1f} minutes of training; checkpoints in {self.out_dir}"
        )

    def early_stopped(self):
        return self.state["bad_epochs"] >= self.args.early_stop

    def end_epoch(self, interrupted):
        """After an epoch's last step: the LR schedule and early-stop count follow the epoch's loss
        (as the original); last.pt is written (every --save-every epochs, and before any KID or
        sample grid, whose failure, out of memory say, then loses nothing); then best.pt if the
        epoch beats every epoch written before by --best-by. A stop request skips the KID and
        the grid."""
        args, state, epoch = self.args, self.state, self.state["epoch"] + 1
        loss = state["epoch_loss_sum"] / state["epoch_finite"]  # the same on every rank
        skipped = state["epoch_skipped"]
        lr = self.training.opt.param_groups[0]["lr"]  # this epoch's; the schedule may lower it now
        if args.lr_schedule == "plateau":
            self.sched.step(loss)
        loss_improved = loss < state["best_loss"]
        state["best_loss"] = min(loss, state["best_loss"])
        state["bad_epochs"] = 0 if loss_improved else state["bad_epochs"] + 1
        final = epoch == args.epochs or self.early_stopped()
        row = self.close_epoch(epoch, loss, lr)
        kid_due = args.eval_every > 0 and not interrupted and (epoch % args.eval_every == 0 or final)
        grid_due = not interrupted and (epoch == 1 or epoch % args.sample_every == 0 or final)
        # The same on every rank (saving is collective). A stop (signal or time budget) ends the
        # run after this epoch: it is always written.
        save_due = (
            epoch % args.save_every == 0 or final or interrupted or self.budget_done or kid_due or grid_due
        )
        if save_due:
            self.save("last.pt", own_bn=not interrupted)
        kid = None  # rank 0 measures it; the other ranks do not need it for any decision
        if kid_due and self.kid_probe is not None:
            with self.after_save("the KID probe", epoch):
                kid, kid_err = self.kid_probe(self.sampling_net())
            row["kid"], row["kid_err"] = round(kid, 6), round(kid_err, 6)
        state["best_kid"] = min(state["best_kid"], kid if kid is not None else math.inf)
        metric = kid if args.best_by == "kid" else loss
        improved = save_due and metric is not None and metric < state["best_written"]
        improved = distributed.any_rank(improved and self.ctx.is_main, self.ctx, self.device)  # KID: rank 0's
        if improved and metric is not None:
            state["best_written"] = metric
        self.report(row, skipped, improved)
        if kid_due:  # last.pt again, now with the KID in its log
            self.save("last.pt")
        if improved:
            self.save("best.pt", own_bn=not interrupted)
        if self.ctx.is_main and grid_due:
            with self.after_save("the sample grid", epoch):
                self.sample_grid(epoch)

    def close_epoch(self, epoch, loss, lr):
        """The epoch's row in the log, and the counters reset for the next epoch -> the row."""
        state, seconds = self.state, self.state["epoch_seconds"]
        row = dict(
            epoch=epoch,
            loss=round(loss, 6),
            lr=lr,
            seconds=round(seconds, 2),
            images_per_s=round(self.n_images / seconds, 2),
            kid=None,
            kid_err=None,
        )
        state["log"].append(row)
        state.update(
            epoch=epoch, images_done=0, epoch_steps=0, epoch_finite=0.0, epoch_skipped=0, epoch_loss_sum=0.0
        )
        state.update(epoch_seconds=0.0)
        return row

    def report(self, row, skipped, improved):
        """The epoch's line; the CSV log and the curves rewritten."""
        kid, seconds = row["kid"], row["seconds"]
        notes = "" if kid is None else f"  KID {kid:.4f} ± {row['kid_err']:.4f}"
        notes += f"  {skipped} steps skipped (fp16 overflow)" if skipped else ""
        notes += "  *best*" if improved else ""
        self.log(
            f"epoch {row['epoch']}/{self.args.epochs}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{seconds:.1f}s  {row['images_per_s']:.1f} img/s{notes}"
        )
        if self.ctx.is_main:
            probe = f"{self.args.eval_steps}-evaluation {self.args.sampler}"
            write_log(self.out_dir, self.state["log"], probe)

    @contextlib.contextmanager
    def after_save(self, what, epoch):
        """Work after last.pt was written: a failure becomes one line that says the epoch is safe."""
        try:
            yield
        except (RuntimeError, ValueError) as e:
            raise UserError(
                f"{what} failed after epoch {epoch} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                f"last.pt holds the epoch: --resume {self.out_dir / 'last.pt'} with a smaller "
                "--eval-samples or --num-samples, or --eval-every 0"
            ) from None

    def sampling_net(self):
        """The EMA network as a noise predictor, as the samplers want it."""
        return as_noise_predictor(self.training.ema, self.cfg.get("prediction", "eps"))

    def sample_grid(self, epoch):
        """epoch_N.png: the EMA network's samples from the same noise every time."""
        grid = generate(
            self.sampling_net(),
            self.sample_noise,
            self.mean,
            self.model_std,
            steps=self.args.sample_steps,
            seed=self.args.seed,
            precision=self.training.precision,
            sampler=self.args.sampler,
            **self.sample_classes,
        )
        save_image(grid, self.out_dir / f"epoch_{epoch}.png", nrow=4)
