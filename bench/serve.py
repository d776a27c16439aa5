"""The server under load: `serve_batching_speedup`, `serve_p95_latency_vs_single`, `serve_restart_ready_speedup`.

    python -m bench.serve [--quick] [--config configs/demo.py]

What runs is `yagg serve` itself, as real uvicorn processes on localhost ports, hit by real HTTP clients, serving an
export of the config's model (`yagg export`'s folder layout; the parameters freshly initialised, since speed does not
depend on the weights, and the tiny random CLIP, whose shapes the demo config has):

  * `serve_batching_speedup`: GIFs/s served to CLIENTS concurrent clients (each sending requests back to back, one
    clip each, the model's default steps) by a server whose calls hold all of them (`--max-batch CLIENTS`), divided by
    the GIFs/s the same server serves them with `--max-batch 1` (one clip per call). The server at its default width
    (the model's `sampling.lanes_per_device`) is measured too (details).
  * `serve_p95_latency_vs_single`: the 95th percentile of a request's latency under that load, divided by the latency
    of one request alone on the same server (best of a few). Lower is better; it is at least the number of calls a
    request waits behind.
  * `serve_restart_ready_speedup`: seconds from start to /readyz 200 with an empty compilation cache, divided by the
    same with the cache the first start filled (`--compile-cache`): what a restart saves.
Each server gets the CPU alone while measured (the others are stopped).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import REPO, Metric, write_metrics

CLIENTS = 8
PROMPTS = ("a red circle moving left", "a blue square moving up", "a green triangle moving right")


def make_export(config_path: str, out: Path) -> Path:
    """An export of the config's model with fresh parameters and the tiny CLIP (contracts/export.py's layout)."""
    import flax.linen as nn
    import jax

    from contracts import export as export_lib
    from contracts.conditioning import load_conditioner
    from contracts.dataset import DEFAULT_FPS, DataFacts
    from model.build import build_unet, params_initializer
    from model.clip import CLIP_FILES
    from model.tiny_clip import make_tiny_clip
    from yagg.config import load_config

    config = load_config(config_path)
    clip = make_tiny_clip(out.parent / "tiny-clip")
    init = params_initializer(build_unet(config), config)
    params = jax.jit(lambda key: nn.unbox(init(key)))(jax.random.PRNGKey(0))
    d = config.data
    facts = DataFacts(int(d.frames), int(d.size), DEFAULT_FPS, load_conditioner(str(clip)).info)
    export_lib.write_export(
        str(out),
        step=0,
        config=config,
        data=facts,
        params=params,
        text_encoder_files={name: (clip / name).read_bytes() for name in CLIP_FILES if (clip / name).is_file()},
        card="# benchmark model (random parameters)\n",
        scores={},
        source={"workdir": "(none)", "dataset": "(none)"},
    )
    return out


class Server:
    def __init__(self, model: Path, cache: Path, *args: str) -> None:
        command = [sys.executable, "-c", "import sys; from yagg.cli import main; sys.exit(main(sys.argv[1:]))"]
        command += ["serve", "--model", str(model), "--port", "0", "--compile-cache", str(cache), *args]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = ""
        for line in self.process.stdout:
            if "listening on http://" in line:
                break
        self.url = line.strip().split("listening on ")[1]
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def wait_ready(self) -> float:
        """Seconds from the process start to /readyz 200."""
        while httpx.get(self.url + "/readyz", timeout=30).status_code != 200:
            assert self.process.poll() is None, "the server exited while warming up"
            time.sleep(0.05)
        return time.perf_counter() - self.started

    def generate(self, prompt: str, seed: int) -> float:
        """Latency of one /v1/generate call, in seconds."""
        start = time.perf_counter()
        answer = httpx.post(self.url + "/v1/generate", json={"prompt": prompt, "seed": seed}, timeout=600)
        assert answer.status_code == 200, answer.text
        return time.perf_counter() - start

    def load(self, clients: int, per_client: int) -> tuple[float, list[float]]:
        """(GIFs/s, latencies) of `clients` threads each sending `per_client` requests back to back."""
        latencies: list[float] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            for k in range(per_client):
                seconds = self.generate(PROMPTS[i % len(PROMPTS)], 1000 * i + k)
                with lock:
                    latencies.append(seconds)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return clients * per_client / (time.perf_counter() - start), latencies

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--config", default="configs/demo.py")
    args = parser.parse_args()
    per_client = 2 if args.quick else 4
    root = Path(tempfile.mkdtemp(prefix="yagg-bench-serve-"))
    try:
        model = make_export(args.config, root / "model")
        cache = root / "cache"
        details: dict = {"config": args.config, "clients": CLIENTS, "requests_per_client": per_client}

        cold = Server(model, cache, "--max-batch", str(CLIENTS))
        details["cold_ready_s"] = cold.wait_ready()
        cold.stop()
        batched = Server(model, cache, "--max-batch", str(CLIENTS))
        details["warm_ready_s"] = batched.wait_ready()
        single_s = min(batched.generate(PROMPTS[0], k) for k in range(3))
        rate, latencies = batched.load(CLIENTS, per_client)
        batched.stop()
        p95 = statistics.quantiles(latencies, n=20)[-1]

        one_at_a_time = Server(model, cache, "--max-batch", "1")
        one_at_a_time.wait_ready()
        rate_one, _ = one_at_a_time.load(CLIENTS, per_client)
        one_at_a_time.stop()

        default = Server(model, cache)
        default.wait_ready()
        width = httpx.get(default.url + "/v1/model", timeout=30).json()["limits"]["max_batch"]
        rate_default, _ = default.load(CLIENTS, per_client)
        default.stop()
        details.update(
            gifs_per_s={f"max_batch_{CLIENTS}": rate, "max_batch_1": rate_one, f"default_width_{width}": rate_default},
            single_request_s=single_s,
            p95_latency_s=p95,
            median_latency_s=statistics.median(latencies),
            cpu_count=os.cpu_count(),
        )
        command = "python -m bench.serve" + (" --quick" if args.quick else "")
        metrics = [
            Metric("serve_batching_speedup", rate / rate_one, ">= 3", command, details, unit="x"),
            Metric("serve_p95_latency_vs_single", p95 / single_s, None, command, details, unit="x"),
            Metric(
                "serve_restart_ready_speedup",
                details["cold_ready_s"] / details["warm_ready_s"],
                ">= 3",
                command,
                details,
                unit="x",
            ),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_metrics(metrics, args.json)


if __name__ == "__main__":
    main()
