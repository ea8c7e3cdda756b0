"""Draw a flower in the browser: a local page that turns a drawing into flowers (SDEdit) or paints
them from noise, with the model loaded once.

    python sd_app.py                                  # then open the address it prints
    python sd_app.py --checkpoint runs/x/best.pt --port 8000

The page and everything it needs are served from this machine (no CDN): it works offline. The
model answers one request at a time, in turn (one lock); at most MAX_PENDING requests are held
(painting or waiting), and the next ones get 503 with Retry-After at once, so a flood of requests
costs neither memory nor an unbounded wait. Each request's work is capped (MAX_WORK), and a
drawing's size is checked from its header before it is decoded. Bad input gets a message and a 4xx
status, and the server keeps serving. Nothing a client sends is used as a file path.
"""

import base64
import io
import json
import math
import sys
import threading
import time
from pathlib import Path

import torch
from flask import Flask, jsonify, request, send_from_directory
from PIL import Image
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from lib.checkpoint import load_model
from lib.classes import GUIDANCE, parse_classes, spread
from lib.cli import ArgumentParser, UserError, run_cli
from lib.data import resize_crop, to_rgb
from lib.distill import distilled_of, refuse_student, student_strength
from lib.metrics import to_uint8
from lib.normalization import model_stats
from lib.runtime import add_device_args, setup
from lib.sample import generate, initial_noise, sketch_per_seed, sketch_steps
from lib.samplers import MIN_EVALUATIONS, SAMPLERS
from sd_inference import DEFAULT_CHECKPOINT, checkpoint_path

PAGE = Path(__file__).resolve().parent / "web"
MAX_REQUEST = 4 * 2**20  # bytes; a drawing as a PNG data URL is tens of KB
# A drawing's sides, read from its header before decoding: a 12 KB PNG can claim 4,194,304 x 1 pixels,
# and a thin one is resized to a long strip before the centre crop.
MAX_SIDE, MAX_ASPECT = 2048, 4
DRAWING_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF"]  # Pillow's others (EPS: Ghostscript) stay out
MAX_IMAGES, MAX_STEPS, MAX_GUIDANCE = 8, 100, 20.0
# A request's work: results x network evaluations, a guided evaluation counting two (its batch is
# twice the size). 400 lets the page's most results (8) take 25 guided steps.
MAX_WORK = 400
MAX_PENDING = 4  # requests held at once, the one painting included; more get 503 at once
# The page's live mode: one result after each stroke, at few evaluations (the Paint button keeps
# the full settings); with --live-checkpoint, a distilled student's own steps instead.
LIVE = dict(sampler="dpm++2m", steps=4)


class BadRequest(ValueError):
    """What the client sent cannot be painted: the message goes back with status 400."""


def number(body, key, default, kind, low, high):
    """body[key] (or the default) as int or float within [low, high], else BadRequest."""
    value = body.get(key, default)
    what = "a whole number" if kind is int else "a number"
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))  # JSON: NaN
    if isinstance(value, bool) or not finite:
        raise BadRequest(f"{key} must be {what}, got {str(value)[:20]}")
    if kind is int and value != int(value):
        raise BadRequest(f"{key} must be {what}, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(f"{key} must be between {low:g} and {high:g}, got {str(value)[:20]}")
    return kind(value)


def read_drawing(data_url, size):
    """'data:image/...;base64,...' -> (1, 3, size, size) uint8, as sd_inference reads --init-image."""
    if not isinstance(data_url, str):
        raise BadRequest("drawing must be an image as a data URL (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data_url.partition("base64,")[2], validate=True)
        with Image.open(io.BytesIO(raw), formats=DRAWING_FORMATS) as img:  # reads the header only
            w, h = img.size
            if max(w, h) > MAX_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
                raise BadRequest(
                    f"the drawing is {w}x{h}: each side at most {MAX_SIDE} pixels and at most "
                    f"{MAX_ASPECT} times the other, please"
                )
            return resize_crop(size)(to_rgb(img))[None]
    except BadRequest:
        raise
    except Exception:  # any decoder failure: truncated, not an image, a format left out
        raise BadRequest(
            "the drawing is not an image this server can read (PNG, JPEG, WebP, BMP, GIF)"
        ) from None


def work(sampler, steps, num_images, strength, guidance, drawing, labels, **_):
    """A request's network evaluations, results x steps (a guided one counting two) -> the count,
    or BadRequest over MAX_WORK."""
    evaluations = steps if drawing is None else sketch_steps(strength, steps, sampler)
    guided = labels is not None and guidance not in (0, 1)
    total = num_images * evaluations * (2 if guided else 1)
    if total > MAX_WORK:
        raise BadRequest(
            f"{num_images} results x {evaluations} steps{' x 2 (guidance)' if guided else ''} = {total} "
            f"network evaluations: at most {MAX_WORK} a request; ask for fewer results or steps"
        )
    return total


def load_student(path, teacher_ckpt, device):
    """--live-checkpoint: a distilled student that paints what the loaded model paints (its size,
    classes and normalization), else UserError."""
    student, ckpt = load_model(path, device)
    if distilled_of(student) is None:
        raise UserError(f"--live-checkpoint {path} is not a distilled student (make one with sd_distill.py)")
    for key in ("image_size", "classes"):
        if ckpt["config"].get(key) != teacher_ckpt["config"].get(key):
            raise UserError(f"--live-checkpoint {path} has another {key} than --checkpoint's model")
    if model_stats(ckpt) != model_stats(teacher_ckpt):
        raise UserError(f"--live-checkpoint {path} works in another normalization than --checkpoint's model")
    return student.to(memory_format=torch.channels_last)


def data_url(image):
    """(3, H, W) float in [0, 1] -> a PNG as a data URL, which the page shows and downloads."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Painter:
    """The model, loaded once; the lock that has requests sampled one at a time, and the slots
    that bound how many are held."""

    def __init__(self, checkpoint, device="cpu", precision="fp32", live_checkpoint=None):
        self.model, ckpt = load_model(checkpoint, device)
        refuse_student(self.model, checkpoint, "give its teacher as --checkpoint and it as --live-checkpoint")
        self.model = self.model.to(memory_format=torch.channels_last)
        self.mean, self.std = model_stats(ckpt)
        self.size, self.precision = ckpt["config"]["image_size"], precision
        self.classes = ckpt["config"].get("classes", [])
        # The page sends these back with each live request; "live" routes it to the student.
        self.student, self.live = None, dict(LIVE, live=True)
        if live_checkpoint is not None:
            self.student = load_student(live_checkpoint, ckpt, device)
            self.live = dict(sampler="ddim", steps=distilled_of(self.student)["steps"], live=True)
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_PENDING)
        self.queued_work, self.seconds_per_work = 0, 0.0  # for Retry-After: the held work's seconds
        self.queue_lock = threading.Lock()

    def info(self):
        """What the page needs to build its controls."""
        return dict(
            image_size=self.size,
            classes=self.classes,
            samplers={name: MIN_EVALUATIONS[name] for name in SAMPLERS},
            max_images=MAX_IMAGES,
            max_steps=MAX_STEPS,
            max_work=MAX_WORK,
            guidance=GUIDANCE,
            live=self.live,
        )

    def options(self, body):
        """A request's JSON -> keyword arguments of paint(); BadRequest names the first bad field."""
        sampler = body.get("sampler", "ddim")
        if not isinstance(sampler, str) or sampler not in SAMPLERS:
            raise BadRequest(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        opts = dict(
            sampler=sampler,
            steps=number(body, "steps", 20, int, MIN_EVALUATIONS[sampler], MAX_STEPS),
            seed=number(body, "seed", 0, int, 0, 2**31 - 1),
            num_images=number(body, "num_images", 4, int, 1, MAX_IMAGES),
            strength=number(body, "strength", 0.6, float, 0.05, 1.0),
            guidance=number(body, "guidance", GUIDANCE, float, 0.0, MAX_GUIDANCE),
            drawing=body.get("drawing"),
            labels=None,
        )
        if body.get("class") not in (None, ""):
            opts["labels"] = spread([self.class_index(body["class"])], opts["num_images"])
        opts["model"] = self.model
        if body.get("live") is True and self.student is not None:  # the student's own settings
            guidance = 0.0 if opts["guidance"] == 0 else 1.0  # its guidance is in its weights; 0: no class
            opts |= dict(model=self.student, sampler="ddim", guidance=guidance, steps=self.live["steps"])
            opts["strength"] = student_strength(opts["strength"], opts["steps"])
        work(**opts)  # refuses too much work before the drawing is decoded
        if opts["drawing"] is not None:
            opts["drawing"] = read_drawing(opts["drawing"], self.size)
        return opts

    def class_index(self, value):
        """A class as its 0-based index (what the page sends) or its name (any case)."""
        if not self.classes:
            raise BadRequest(
                "class needs a class-conditional model (sd_train.py --class-cond); this one is not"
            )
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(self.classes):
                raise BadRequest(f"class must be an index from 0 to {len(self.classes) - 1}, got {value}")
            return value
        by_name = {name.lower(): i for i, name in enumerate(self.classes)}
        if str(value).lower() in by_name:  # a name may hold a comma
            return by_name[str(value).lower()]
        try:
            chosen = parse_classes(str(value), self.classes)
        except UserError as e:
            raise BadRequest(str(e).replace("--class", "class").replace(" (--list-classes)", "")) from None
        if len(chosen) != 1:
            raise BadRequest(f"class must be one class, got {value!r}")
        return chosen[0]

    def paint(self, model, sampler, steps, seed, num_images, strength, guidance, drawing, labels):
        """-> ((num_images, 3, S, S) floats, seconds waiting for the model, seconds painting):
        from the drawing (one result per seed, seed + i, as sd_inference.py --init-image), or from
        noise; model: the loaded model or its student."""
        common = dict(sampler=sampler, precision=self.precision, guidance=guidance)
        cost = work(sampler, steps, num_images, strength, guidance, drawing, labels)
        with self.queue_lock:
            self.queued_work += cost
        t0 = time.perf_counter()
        try:
            with self.lock:
                t1 = time.perf_counter()
                if drawing is None:
                    noise = initial_noise(num_images, self.size, seed)
                    images = generate(
                        model, noise, self.mean, self.std, steps, seed=seed, labels=labels, **common
                    )
                else:
                    _, images = sketch_per_seed(
                        model,
                        drawing,
                        self.mean,
                        self.std,
                        strength,
                        steps,
                        seed,
                        num_images,
                        labels,
                        **common,
                    )
                t2 = time.perf_counter()
        finally:
            with self.queue_lock:
                self.queued_work -= cost
        self.seconds_per_work = (t2 - t1) / cost
        return images, t1 - t0, t2 - t1

    def retry_after(self):
        """Seconds until the held requests are likely done (at least 1): the Retry-After of a 503."""
        return max(1, math.ceil(self.queued_work * self.seconds_per_work))


def create_app(painter):
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST

    @app.get("/")
    def index():
        return send_from_directory(PAGE, "index.html")

    @app.get("/api/info")
    def info():
        return jsonify(painter.info())

    @app.post("/api/paint")
    def paint():
        # Only held requests read their body, decode and wait; the rest are answered at once.
        if not painter.slots.acquire(blocking=False):
            wait = painter.retry_after()
            reply = jsonify(error=f"the server is busy with other drawings: try again in {wait} s")
            return reply, 503, {"Retry-After": str(wait)}
        try:
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                return jsonify(error="send the settings as a JSON object"), 400
            images, waited, painted = painter.paint(**painter.options(body))
        except BadRequest as e:
            return jsonify(error=str(e)), 400
        finally:
            painter.slots.release()
        return jsonify(
            images=[data_url(img) for img in images], waited=round(waited, 3), seconds=round(painted, 3)
        )

    @app.errorhandler(HTTPException)
    def http_error(e):  # 404, 405, 413 (MAX_REQUEST) ...: a JSON message the page can show
        response = e.get_response()  # keeps headers such as a 405's Allow
        message = f"the request is over {MAX_REQUEST // 2**20} MB" if e.code == 413 else e.description
        response.data, response.content_type = json.dumps({"error": message}), "application/json"
        return response

    return app


def get_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help=f"default: models/{DEFAULT_CHECKPOINT.name}")
    p.add_argument(
        "--live-checkpoint",
        default=None,
        help=f"a distilled student (sd_distill.py) of the model for 'paint as I draw' (default: the "
        f"model itself at {LIVE['sampler']}, {LIVE['steps']} steps)",
    )
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    p.add_argument("--port", type=int, default=7860, help="0 picks a free one")
    add_device_args(p, "for sampling")
    return p


def serve(painter, host, port):
    """A threaded server (each request waits its turn at the model's lock) -> the server."""
    try:
        return make_server(host, port, create_app(painter), threaded=True)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); try another --port") from None


def run(args):
    device, precision = setup(args.device, args.precision)
    painter = Painter(checkpoint_path(args.checkpoint), device, precision, args.live_checkpoint)
    server = serve(painter, args.host, args.port)
    classes = f", {len(painter.classes)} classes" if painter.classes else ""
    live = f"; live: {args.live_checkpoint}, {painter.live['steps']} steps" if painter.student else ""
    print(f"model: {painter.size} px{classes}, {device} {precision}{live}")
    print(f"open http://{args.host}:{server.server_port}/ in a browser (Ctrl-C stops the server)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # the usual way to stop a server: not an error
        print("stopped")
    finally:
        server.server_close()


def main(argv=None):
    return run_cli(run, get_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
