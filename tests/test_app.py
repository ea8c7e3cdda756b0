"""sd_app.py: the API (a drawing in, flowers out; every bad input a 4xx with a message, and the
server still serving), requests in parallel, and the page in a real headless Chromium."""

import base64
import io
import json
import math
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_checkpoint import tiny_checkpoint
from test_distill import student_checkpoint

import sd_app
from conftest import ORIGINAL_RECIPE, ROOT, TINY
from lib.checkpoint import make_checkpoint
from lib.files import atomic_save
from lib.metrics import to_uint8
from lib.sample import sketch_per_seed
from lib.unet import build_unet
from sd_app import MAX_PENDING, MAX_REQUEST, MAX_WORK, Painter, create_app, read_drawing, serve
from sd_inference import checkpoint_path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def png_url(img):
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def drawn():
    img = Image.new("RGB", (200, 150), "white")
    ImageDraw.Draw(img).ellipse((60, 30, 140, 110), fill=(230, 40, 40))
    return png_url(img)


def decode(url):
    return torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",")[1])))))


@pytest.fixture(scope="module")
def painter():
    return Painter(ORIGINAL_RECIPE)


@pytest.fixture(scope="module")
def client(painter):
    return create_app(painter).test_client()


def test_a_drawing_in_gives_that_many_flowers_of_the_models_size(client):
    reply = client.post("/api/paint", json=dict(drawing=drawn(), num_images=3, steps=4, seed=5))
    assert reply.status_code == 200, reply.json
    images = [decode(url) for url in reply.json["images"]]
    assert len(images) == 3 and all(img.shape == (64, 64, 3) for img in images)
    again = client.post("/api/paint", json=dict(drawing=drawn(), num_images=1, steps=4, seed=5)).json
    assert again["images"][0] == reply.json["images"][0]  # seed 5 is seed 5
    noise = client.post("/api/paint", json=dict(num_images=2, steps=4)).json["images"]
    assert len(noise) == 2 and noise[0] != reply.json["images"][0]


def test_the_page_and_its_settings_are_served(client):
    assert b"<canvas" in client.get("/").data
    info = client.get("/api/info").json
    assert info["image_size"] == 64 and info["classes"] == [] and info["samplers"]["heun"] == 3
    assert info["live"] == dict(sampler="dpm++2m", steps=4, live=True) and info["max_work"] == MAX_WORK


@pytest.mark.parametrize(
    "body,status,message",
    [
        (dict(steps=0), 400, "steps must be between 1 and 100"),
        (dict(steps=2, sampler="heun"), 400, "steps must be between 3 and 100"),
        (dict(strength=1.5, drawing=None), 400, "strength must be between"),
        (dict(num_images=9), 400, "num_images must be between 1 and 8"),
        (dict(seed="x"), 400, "seed must be a whole number"),
        (dict(sampler="euler"), 400, "sampler must be one of ddim"),
        (dict(drawing="data:image/png;base64,aGVsbG8="), 400, "not an image this server can read"),
        (dict(drawing="../../etc/passwd"), 400, "not an image this server can read"),
        (dict(drawing=png_url(Image.new("RGB", (5000, 5000)))), 400, "each side at most 2048 pixels"),
        (dict(drawing=png_url(Image.new("1", (200_000, 20)))), 400, "the drawing is 200000x20"),
        (dict(drawing=png_url(Image.new("1", (4_194_304, 1)))), 400, "each side at most 2048"),
        (dict(drawing=png_url(Image.new("RGB", (2000, 400)))), 400, "at most 4 times the other"),
        (dict(num_images=8, steps=51), 400, "8 results x 51 steps = 408 network evaluations: at most 400"),
        (dict(drawing=drawn(), num_images=8, steps=100, strength=0.6), 400, "x 60 steps = 480"),
        (dict(sampler=["ddim"]), 400, "sampler must be one of"),
        (dict(guidance=1e400), 400, "guidance must be a number"),
        (dict(drawing=5), 400, "drawing must be an image as a data URL"),
        (dict(**{"class": "sunflower"}), 400, "needs a class-conditional model"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message_and_the_server_keeps_serving(client, body, status, message):
    reply = client.post("/api/paint", json=body)
    assert reply.status_code == status and message in reply.json["error"]
    assert client.post("/api/paint", json=dict(num_images=1, steps=2)).status_code == 200


def test_numbers_json_allows_but_python_would_choke_on(client):
    for raw in ('{"steps": NaN}', '{"steps": Infinity}', '{"seed": ' + "9" * 400 + "}"):
        reply = client.post("/api/paint", data=raw, content_type="application/json")
        assert reply.status_code == 400 and "must be" in reply.json["error"], raw


def test_oversized_and_odd_requests(client):
    huge = Image.frombytes("RGB", (1300, 1300), os.urandom(1300 * 1300 * 3))  # noise does not compress
    reply = client.post("/api/paint", json=dict(drawing=png_url(huge), num_images=1))
    assert reply.status_code == 413 and "over 4 MB" in reply.json["error"]
    assert MAX_REQUEST == 4 * 2**20
    reply = client.post("/api/paint", data="steps=3", content_type="text/plain")
    assert reply.status_code == 400 and "JSON object" in reply.json["error"]
    reply = client.get("/api/paint")
    assert reply.status_code == 405 and reply.headers["Allow"] and "error" in reply.json
    assert client.get("/etc/passwd").status_code == 404


def test_a_drawing_too_thin_or_too_large_is_refused_from_its_header(client, monkeypatch):
    def never(*args):
        raise AssertionError("the drawing was decoded")

    monkeypatch.setattr(sd_app, "to_rgb", never)
    for size in [(200_000, 20), (4_194_304, 1), (3000, 3000)]:
        reply = client.post("/api/paint", json=dict(drawing=png_url(Image.new("1", size))))
        assert reply.status_code == 400 and "each side at most" in reply.json["error"]
    assert client.post("/api/paint", json=dict(num_images=8, steps=51)).status_code == 400  # before decoding


def test_a_request_reports_its_wait_and_its_painting_apart(client):
    reply = client.post("/api/paint", json=dict(num_images=1, steps=2)).json
    assert reply["waited"] >= 0 and reply["seconds"] > 0


def test_work_counts_results_steps_and_guidance():
    common = dict(sampler="ddim", steps=20, num_images=4, strength=0.5, guidance=2.0)
    assert sd_app.work(**common, drawing=None, labels=None) == 80
    assert sd_app.work(**common, drawing=None, labels=torch.zeros(4)) == 160  # a guided step: two
    assert sd_app.work(**{**common, "guidance": 1.0}, drawing=None, labels=torch.zeros(4)) == 80
    assert sd_app.work(**common, drawing="png", labels=None) == 40  # from t = 0.5: half the steps
    assert sd_app.work(**{**common, "num_images": 8, "steps": 50}, drawing=None, labels=None) == MAX_WORK


def test_a_conditional_model_paints_the_class_asked_for(tmp_path):
    torch.manual_seed(0)
    cfg = dict(TINY, num_classes=2, classes=["rose", "tulip"])
    net = build_unet(cfg).eval()
    atomic_save(make_checkpoint(cfg, [0.5] * 3, [0.25] * 3, net.state_dict()), tmp_path / "c.pt")
    client = create_app(Painter(tmp_path / "c.pt")).test_client()
    assert client.get("/api/info").json["classes"] == ["rose", "tulip"]
    body = dict(num_images=1, steps=2, seed=1)
    rose = client.post("/api/paint", json={**body, "class": "rose", "guidance": 3}).json["images"]
    tulip = client.post("/api/paint", json={**body, "class": "Tulip", "guidance": 3}).json["images"]
    assert rose != tulip
    assert client.post("/api/paint", json={**body, "class": 1, "guidance": 3}).json["images"] == tulip
    reply = client.post("/api/paint", json={**body, "class": 2})
    assert reply.status_code == 400 and "index from 0 to 1" in reply.json["error"]
    reply = client.post("/api/paint", json={**body, "class": "tulp"})
    assert reply.status_code == 400 and "did you mean 'tulip'" in reply.json["error"]


@pytest.fixture(scope="module")
def server():
    """The page as `python sd_app.py` serves it: the default, class-conditional model."""
    srv = serve(Painter(checkpoint_path(None)), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(port, body, headers=False):
    """-> (status, JSON reply[, headers]) of a POST /api/paint over a real socket."""
    conn = HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/api/paint", body=body, headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    answer = reply.status, json.loads(reply.read())
    return (*answer, dict(reply.getheaders())) if headers else answer


def test_as_many_requests_at_once_as_are_held_are_all_answered_as_one_by_one(server):
    bodies = [json.dumps(dict(num_images=2, steps=3, seed=seed)) for seed in range(MAX_PENDING)]
    with ThreadPoolExecutor(MAX_PENDING) as pool:
        together = list(pool.map(lambda body: post(server.server_port, body), bodies))
    alone = [post(server.server_port, body) for body in bodies]
    assert [status for status, _ in together] == [200] * MAX_PENDING
    assert [reply["images"] for _, reply in together] == [reply["images"] for _, reply in alone]


def test_an_oversized_request_gets_its_413_over_a_real_socket(server):
    status, reply = post(server.server_port, json.dumps(dict(drawing="A" * (5 * 2**20))))
    assert status == 413 and "over 4 MB" in reply["error"]
    assert post(server.server_port, json.dumps(dict(num_images=1, steps=2)))[0] == 200


def test_a_flood_of_the_largest_requests_is_answered_and_the_server_then_serves(tmp_path):
    """50 at once of the most work a request may ask: each gets its flowers or a 503 with
    Retry-After, never more than MAX_PENDING are held (so none waits longer than MAX_PENDING of
    them take), and a normal request is served after."""
    torch.manual_seed(0)
    net = build_unet(TINY).eval()
    atomic_save(make_checkpoint(TINY, [0.5] * 3, [0.25] * 3, net.state_dict()), tmp_path / "t.pt")
    painter = Painter(tmp_path / "t.pt")
    held, most, count = [0], [0], threading.Lock()
    options = painter.options

    def counted(body):  # runs in a held slot, before the wait for the model
        with count:
            held[0] += 1
            most[0] = max(most[0], held[0])
        try:
            return options(body)
        finally:
            with count:
                held[0] -= 1

    painter.options = counted
    srv = serve(painter, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        worst = json.dumps(dict(drawing=drawn(), num_images=8, steps=50, strength=1.0, sampler="heun"))
        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(lambda _: post(srv.server_port, worst, headers=True), range(50)))
        statuses = [status for status, _, _ in replies]
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses
        for status, reply, headers in replies:
            if status == 503:
                assert "busy" in reply["error"] and int(headers["Retry-After"]) >= 1
            else:
                assert len(reply["images"]) == 8
        assert most[0] <= MAX_PENDING
        assert post(srv.server_port, json.dumps(dict(num_images=1, steps=2)))[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_drawing_in_a_real_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-dev.txt")
    if not shutil.which(CHROMIUM):
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1100, "height": 620})
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('model:')")
        page.fill("#num-images", "3")
        page.select_option("#class", label="sunflower")
        page.click("button[data-size='28']")
        box = page.locator("#canvas").bounding_box()

        def stroke(colour, points):
            page.click(f"button[title='{colour}']")
            page.mouse.move(box["x"] + points[0][0] * box["width"], box["y"] + points[0][1] * box["height"])
            page.mouse.down()
            for x, y in points[1:]:
                page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=4)
            page.mouse.up()

        ring = [
            (0.5 + 0.2 * math.cos(a / 8 * math.pi), 0.4 + 0.2 * math.sin(a / 8 * math.pi)) for a in range(17)
        ]
        stroke("#43a047", [(0.5, 0.55), (0.5, 0.95)])  # a stem,
        stroke("#f48fb1", ring)  # pink petals around
        stroke("#fdd835", [(0.5, 0.4), (0.52, 0.42), (0.48, 0.38)])  # a yellow heart
        page.click("#paint")
        page.wait_for_function(
            "document.querySelectorAll('#results figure.result').length === 3", timeout=120_000
        )
        # docs/app.png is this screenshot: APP_SCREENSHOT=docs/app.png python -m pytest -k browser
        page.screenshot(path=os.environ.get("APP_SCREENSHOT", str(tmp_path / "app.png")), full_page=True)
        drawn_results = page.eval_on_selector_all(
            "#results figure.result img", "imgs => imgs.map(i => i.src)"
        )
        pixels = [decode(url).float() for url in drawn_results]
        assert all(img.std() > 10 for img in pixels)  # not blank
        page.click("#clear")
        page.click("#paint")
        page.wait_for_function(
            "src => document.querySelector('#results figure.result img').src !== src", arg=drawn_results[0]
        )
        blank_results = page.eval_on_selector_all(
            "#results figure.result img", "imgs => imgs.map(i => i.src)"
        )
        for a, b in zip(drawn_results, blank_results, strict=True):
            assert (decode(a).float() - decode(b).float()).abs().mean() > 10  # the drawing mattered
        page.fill("#steps", "0")
        page.click("#random")
        page.wait_for_function("document.getElementById('message').textContent.includes('steps must be')")
        # Live mode: switched on, it paints the (blank) canvas; each stroke then paints again.
        page.check("#live")
        page.wait_for_function("window.livePictures === 1", timeout=120_000)
        blank = page.get_attribute("#live-figure img", "src")
        stroke("#e53935", ring)
        page.wait_for_function("window.livePictures >= 2", timeout=120_000)
        live = page.get_attribute("#live-figure img", "src")
        print(f"live mode: a picture {page.evaluate('window.liveSeconds'):.2f} s after the stroke ended")
        assert (decode(live).float() - decode(blank).float()).abs().mean() > 10  # the stroke mattered
        assert "after the stroke" in page.text_content("#live-figure figcaption")
        assert "steps must be" in page.text_content("#message")  # the Paint button's message stays
        browser.close()


def test_the_docs_state_the_limits_the_code_holds():
    text = (ROOT / "docs" / "app.md").read_text()
    side, aspect = sd_app.MAX_SIDE, sd_app.MAX_ASPECT
    assert f"each side at most {side} pixels and at most {aspect} times the other" in text
    assert f"results x network evaluations at most {MAX_WORK}" in text
    assert f"| requests held | {MAX_PENDING} (503" in text
    assert f"| request | {MAX_REQUEST // 2**20} MB" in text


def test_live_requests_go_to_the_student_and_paint_requests_to_the_model(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "t.pt")
    student_checkpoint(tmp_path / "s.pt", steps=4)
    painter = Painter(tmp_path / "t.pt", live_checkpoint=tmp_path / "s.pt")
    client = create_app(painter).test_client()
    assert client.get("/api/info").json["live"] == dict(sampler="ddim", steps=4, live=True)
    body = dict(drawing=drawn(), num_images=1, seed=3, strength=0.6, sampler="ddim", steps=4)
    live = decode(client.post("/api/paint", json=dict(body, live=True)).json["images"][0])
    full = decode(client.post("/api/paint", json=body).json["images"][0])
    drawing = read_drawing(drawn(), 32)
    for model, strength, got in [(painter.student, 0.5, live), (painter.model, 0.6, full)]:
        _, expected = sketch_per_seed(model, drawing, painter.mean, painter.std, strength, 4, 3, 1)
        assert torch.equal(to_uint8(expected)[0].permute(1, 2, 0), got)
    assert not torch.equal(live, full)

    assert (
        sd_app.main(["--checkpoint", str(tmp_path / "t.pt"), "--live-checkpoint", str(tmp_path / "t.pt")])
        == 2
    )
    assert "is not a distilled student" in capsys.readouterr().err
