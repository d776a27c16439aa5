"""`yagg serve` (serve/): real uvicorn processes on ephemeral localhost ports, serving the tiny run's model, hit by real
HTTP clients; the web page in Debian's Chromium driven by Playwright."""

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import browser
import httpx
import pytest
from conftest import REPO, subprocess_env
from PIL import Image

from contracts import media
from inference.generator import Generator
from inference.sample import main as sample_main

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]


class Server:
    """A `yagg serve` subprocess; `url` once it listens."""

    def __init__(self, args, cache, log_path):
        self.log_path = log_path
        command = [sys.executable, "-c", "import sys; from yagg.cli import main; sys.exit(main(sys.argv[1:]))"]
        command += ["serve", "--port", "0", "--compile-cache", str(cache), *args]
        with open(log_path, "w") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=log, text=True
            )
        self.url = None
        deadline = time.monotonic() + 120
        for line in self.process.stdout:
            if "listening on http://" in line:
                self.url = line.strip().split("listening on ")[1]
                break
            assert time.monotonic() < deadline, "the server printed no address"
        assert self.url, f"the server did not start:\n{self.log()}"
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # drain stdout

    def log(self):
        return self.log_path.read_text()

    def get(self, path, **kwargs):
        return httpx.get(self.url + path, timeout=120, **kwargs)

    def post(self, path, body, **kwargs):
        return httpx.post(self.url + path, json=body, timeout=120, **kwargs)

    def wait_ready(self, timeout=400):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited:\n{self.log()[-3000:]}"
            if self.get("/readyz").status_code == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"not ready within {timeout} s:\n{self.log()[-3000:]}")

    def metric(self, name, **labels):
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in self.get("/metrics").text.splitlines():
            if line.split(" ")[0] == wanted:
                return float(line.split(" ")[1])
        return 0.0

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-compile-cache")


@pytest.fixture(scope="module")
def server(tiny_export, cache, tmp_path_factory):
    """The model served with defaults, but a long batch window so concurrent requests surely share calls."""
    s = Server(["--model", str(tiny_export), "--batch-wait-ms", "700"], cache, tmp_path_factory.mktemp("s") / "log")
    try:
        assert s.get("/healthz").json() == {"status": "alive"}  # alive while still warming up
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def guarded(tiny_export, cache, tmp_path_factory):
    """A token-protected server whose oldest clip waits 3 s for company, with room for 2 waiting clips."""
    folder = tmp_path_factory.mktemp("guarded")
    (folder / "tokens").write_text("first-token\nsecond-token\n")
    args = ["--model", str(tiny_export), "--token-file", str(folder / "tokens"), "--batch-wait-ms", "3000"]
    s = Server([*args, "--max-queue", "2"], cache, folder / "log")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


AUTH = {"Authorization": "Bearer second-token"}


def test_concurrent_clients_get_their_own_clips_batched_together(server, tiny_export, tmp_path):
    requests = [(PROMPTS[i % 3], 10 + i) for i in range(6)]
    answers = [None] * len(requests)

    def client(i):
        prompt, seed = requests[i]
        answers[i] = server.post("/v1/generate", {"prompt": prompt, "seed": seed, "steps": 3})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a.status_code == 200 and a.headers["content-type"] == "image/gif" for a in answers)
    assert [int(a.headers["x-yagg-seed"]) for a in answers] == [seed for _, seed in requests]
    # What each client got is what it would have got alone: the bytes `yagg sample` writes for that prompt and seed.
    for i in (0, 4):
        out = tmp_path / f"{i}.gif"
        prompt, seed = requests[i]
        assert (
            sample_main(["--model", str(tiny_export), prompt, "--seed", str(seed), "--steps", "3", "--out", str(out)])
            == 0
        )
        assert answers[i].content == out.read_bytes()
    generator = Generator.load(tiny_export)
    clips = generator.generate([p for p, _ in requests], [s for _, s in requests], steps=3)
    assert [a.content for a in answers] == [media.gif_bytes(c, clips.fps) for c in clips.pixels]
    # Some compiled call held more than one client's clip.
    assert server.metric("yagg_batch_size_sum") > server.metric("yagg_batch_size_count")
    assert server.metric("yagg_requests_total", outcome="ok", route="generate") >= 6


def test_no_request_compiles_after_ready(server):
    before = server.metric("yagg_compiles")
    body = {"prompt": "a yellow circle moving down a long way across the whole screen", "steps": 7, "method": "ddpm"}
    assert server.post("/v1/generate", {**body, "guidance": 2.5, "negative_prompt": "a blue square"}).status_code == 200
    assert server.post("/v1/generate", {"prompt": "x", "num": 2, "eta": 0.5, "steps": 1}).status_code == 200
    assert server.metric("yagg_compiles") == before


def test_model_route_describes_the_model_and_its_limits(server):
    model = server.get("/v1/model").json()
    assert (model["step"], model["frames"], model["size"]) == (4, 4, 16)
    assert model["limits"]["max_steps"] == 100 and model["limits"]["max_batch"] == 8
    assert model["defaults"]["method"] == "ddim"


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"prompt": " ".join(["word"] * 100)}, "prompt", "tokens long"),
        ({"prompt": "a cat", "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"prompt": "a cat", "steps": 101}, "steps", "between 1 and 100"),
        ({"prompt": "a cat", "num": 5}, "num", "between 1 and 4"),
        ({"prompt": "a cat", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "a cat", "guidance": 31}, "guidance", "less than or equal to 30"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "a cat", "method": "euler"}, "method", "'ddim' or 'ddpm'"),
        ({"prompt": "a cat", "steps": "many"}, "steps", "valid integer"),
    ],
)
def test_bad_input_gets_422_naming_the_field_and_the_limit(server, body, field, message):
    answer = server.post("/v1/jobs", body)
    assert answer.status_code == 422
    (error,) = [e for e in answer.json()["detail"] if e["loc"][-1] == field]
    assert message in error["msg"]


def test_an_oversized_body_gets_413(server):
    answer = httpx.post(server.url + "/v1/jobs", content=b"{" + b" " * 20000 + b"}", timeout=30)
    assert answer.status_code == 413


def test_events_deliver_every_step_then_done_and_results_can_be_fetched(server):
    job = server.post("/v1/jobs", {"prompt": PROMPTS[0], "seed": 1, "steps": 5, "num": 2}).json()
    assert job["state"] == "queued"
    events = []
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", timeout=120) as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
    assert events[-1][0] == "done"
    running = [status["step"] for name, status in events if status["state"] == "running"]
    assert running[0] == 0 and sorted(set(running)) == [0, 1, 2, 3, 4, 5]  # every denoising step, then done
    result = server.get(f"/v1/jobs/{job['id']}/result").json()
    assert [clip["seed"] for clip in result["clips"]] == [1, 2]
    gif = server.get(result["clips"][1]["url"])
    assert gif.headers["x-yagg-seed"] == "2" and gif.content[:6] == b"GIF89a"
    status = server.get(f"/v1/jobs/{job['id']}").json()
    assert status["state"] == "done" and status["clips_done"] == 2


def test_an_idempotent_resubmit_returns_the_same_job(server):
    body = {"prompt": PROMPTS[1], "seed": 5, "steps": 2}
    first = server.post("/v1/jobs", body, headers={"Idempotency-Key": "retry-1"})
    again = server.post("/v1/jobs", body, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and first.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    other = server.post("/v1/jobs", {**body, "seed": 6}, headers={"Idempotency-Key": "retry-1"})
    assert other.status_code == 409 and "another request" in other.json()["detail"]


def test_auth_guards_every_v1_route_but_not_health(guarded):
    assert guarded.get("/v1/model").status_code == 401
    assert guarded.get("/v1/model", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert guarded.get("/v1/model", headers=AUTH).status_code == 200
    assert guarded.post("/v1/jobs", {"prompt": "a cat"}).status_code == 401
    assert guarded.get("/healthz").status_code == guarded.get("/readyz").status_code == 200
    assert guarded.get("/").status_code == 200


def test_a_full_queue_answers_429_and_a_cancelled_queued_job_never_runs(guarded):
    batches = guarded.metric("yagg_batch_size_count")
    waiting = guarded.post("/v1/jobs", {"prompt": PROMPTS[0], "num": 2, "steps": 2}, headers=AUTH).json()
    full = guarded.post("/v1/jobs", {"prompt": PROMPTS[1], "steps": 2}, headers=AUTH)
    assert (
        full.status_code == 429 and int(full.headers["retry-after"]) >= 1 and "queue is full" in full.json()["detail"]
    )
    cancelled = httpx.delete(f"{guarded.url}/v1/jobs/{waiting['id']}", headers=AUTH, timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    time.sleep(3.5)  # past the batch window the job would have waited for
    status = guarded.get(f"/v1/jobs/{waiting['id']}", headers=AUTH).json()
    assert status["state"] == "cancelled" and status["clips_done"] == 0 and status["model_step"] is None
    assert guarded.metric("yagg_batch_size_count") == batches  # nothing ran
    assert guarded.get(f"/v1/jobs/{waiting['id']}/result", headers=AUTH).status_code == 409


def test_a_client_that_leaves_before_its_turn_is_dropped_from_the_queue(guarded):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(guarded.url + "/v1/generate", json={"prompt": "a cat", "steps": 2}, headers=AUTH, timeout=0.5)
    deadline = time.monotonic() + 10
    while guarded.metric("yagg_requests_total", outcome="disconnected", route="generate") < 1:
        assert time.monotonic() < deadline, "the server did not notice the client leave"
        time.sleep(0.2)
    time.sleep(3.5)
    assert guarded.metric("yagg_queue_depth") == 0
    assert guarded.metric("yagg_jobs_finished_total", state="cancelled") >= 1


def test_follow_swaps_in_a_new_checkpoint_and_sigterm_drains_then_exits_0(tiny_run, cache, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tiny_run.workdir / "checkpoints" / "2", workdir / "checkpoints" / "2")
    s = Server(["--workdir", str(workdir), "--follow", "--poll-s", "0.3"], cache, tmp_path / "log")
    try:
        s.wait_ready()
        assert s.get("/v1/model").json()["step"] == 2
        shutil.copytree(tiny_run.workdir / "checkpoints" / "4", workdir / "checkpoints" / ".4-incoming")
        os.rename(workdir / "checkpoints" / ".4-incoming", workdir / "checkpoints" / "4")
        deadline = time.monotonic() + 60
        while s.get("/v1/model").json()["step"] != 4:
            assert time.monotonic() < deadline, f"checkpoint 4 was not swapped in:\n{s.log()[-2000:]}"
            time.sleep(0.2)
        assert s.metric("yagg_model_step") == 4

        # SIGTERM with a job running: not ready at once, new work refused, the job finishes, exit status 0.
        job = s.post("/v1/jobs", {"prompt": PROMPTS[2], "steps": 60}).json()
        s.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while s.get("/readyz").status_code != 503:
            assert time.monotonic() < deadline
        assert s.get("/readyz").json()["status"] == "draining"
        assert s.post("/v1/jobs", {"prompt": "late"}).status_code == 503
        with httpx.stream("GET", f"{s.url}/v1/jobs/{job['id']}/events", timeout=120) as stream:
            last = [line for line in stream.iter_lines() if line.startswith("event:")][-1]
        assert last == "event: done"
        assert s.process.wait(timeout=60) == 0
    finally:
        s.stop()


@pytest.mark.skipif(browser.CHROMIUM is None, reason=browser.NEEDS_CHROMIUM)
def test_the_page_generates_a_gif_with_a_moving_progress_bar(server):
    with browser.page(viewport={"width": 375, "height": 740}) as page:  # a phone's width
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('steps').value !== ''")  # the model's defaults arrived
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 375
        page.fill("#prompt", "a green circle moving up")
        page.fill("#seed", "42")
        page.fill("#steps", "40")
        # Record every value the progress bar shows.
        page.evaluate(
            """window.__seen = []; setInterval(() => {
                 const v = document.getElementById('progress').value;
                 if (window.__seen[window.__seen.length - 1] !== v) window.__seen.push(v); }, 2)"""
        )
        page.click("#generate")
        page.wait_for_selector("#result:not([hidden])", timeout=120_000)
        seen = page.evaluate("window.__seen")
        assert any(0 < v < 1 for v in seen), seen  # it moved through the steps
        assert "seed 42" in page.inner_text("#caption")
        data = page.evaluate(
            """async () => { const b = await (await fetch(document.getElementById('gif').src)).arrayBuffer();
                 let s = ''; for (const x of new Uint8Array(b)) s += String.fromCharCode(x); return btoa(s); }"""
        )
        with Image.open(io.BytesIO(base64.b64decode(data))) as gif:
            assert gif.n_frames == 4 and gif.size == (16, 16)  # the model's frames
        assert page.get_attribute("#download", "download") == "yagg-seed-42.gif"
        assert page.locator("#recent-list li").count() == 1
