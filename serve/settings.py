"""Everything `yagg serve` can be told, declared once: each field's default, flag and help text (the command line
parser is built from these fields, and tests and `create_app` take the dataclass itself)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any


def default_compile_cache() -> str:
    """Where compiled programs are kept between starts: $XDG_CACHE_HOME/yagg/jax, else ~/.cache/yagg/jax."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "yagg", "jax")


def _setting(default: Any, help: str, **flag: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    model: str | None = _setting(None, "an exported model folder (yagg export), local or gs://")
    workdir: str | None = _setting(None, "a training run's folder, local or gs://: its newest finished checkpoint")
    follow: bool = _setting(
        False,
        "with --workdir: load each newly finished checkpoint in the background and swap it in between batches",
        action="store_true",
    )
    host: str = _setting("127.0.0.1", "address to bind; 0.0.0.0 serves other machines (put a proxy with TLS first)")
    port: int = _setting(8000, "port to bind (0: any free port, printed at start)", type=int)
    max_batch: int | None = _setting(
        None,
        "clips per compiled call, over all devices (default: the model's sampling.lanes_per_device x devices). "
        "Clips are byte-identical to `yagg sample` at the default; another width changes their last bits",
        type=int,
    )
    batch_wait_ms: float = _setting(
        50.0, "how long the oldest waiting clip waits for others to share its call (ms)", type=float
    )
    max_queue: int = _setting(64, "clips that may wait; beyond it submits get 429 with Retry-After", type=int)
    token_file: str | None = _setting(
        None, "a file of bearer tokens, one per line: every /v1 route then needs `Authorization: Bearer TOKEN`"
    )
    compile_cache: str = _setting(
        default_compile_cache(),
        "folder of JAX's persistent compilation cache, so a restart is ready sooner ('none': no cache)",
    )
    max_steps: int = _setting(100, "the most denoising steps a request may ask for", type=int)
    max_num: int = _setting(4, "the most clips one request may ask for", type=int)
    methods: tuple[str, ...] = _setting(("ddim", "ddpm"), "samplers requests may use", nargs="+")
    request_timeout_s: float = _setting(
        300.0, "a request not done within this many seconds fails (504 for /v1/generate)", type=float
    )
    result_ttl_s: float = _setting(600.0, "how long finished jobs and their GIFs are kept (s)", type=float)
    max_results: int = _setting(256, "the most finished jobs kept (the oldest go first)", type=int)
    poll_s: float = _setting(10.0, "with --follow: seconds between looks for a new checkpoint", type=float)
    drain_timeout_s: float = _setting(
        60.0, "on SIGTERM: how long to finish the running batch and the queue before exiting", type=float
    )
    max_body_bytes: int = _setting(16384, "the largest request body accepted (413 beyond)", type=int)
    cors_origins: tuple[str, ...] = _setting(
        (), "origins allowed to call the API from browsers (no CORS headers unless given)", nargs="+"
    )

    def problems(self) -> list[str]:
        from contracts import storage

        bad_paths = []
        for flag, value in (("--model", self.model), ("--workdir", self.workdir)):
            try:
                if value is not None:
                    storage.check(value, flag)
            except storage.PathError as e:
                bad_paths.append(str(e))
        checks = [(False, message) for message in bad_paths] + [
            ((self.model is None) != (self.workdir is None), "give exactly one of --model and --workdir"),
            (not self.follow or self.workdir is not None, "--follow needs --workdir (an export does not change)"),
            (self.max_batch is None or self.max_batch >= 1, f"--max-batch must be at least 1, got {self.max_batch}"),
            (self.batch_wait_ms >= 0, f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}"),
            (self.max_queue >= 1, f"--max-queue must be at least 1, got {self.max_queue}"),
            (self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (self.max_num >= 1, f"--max-num must be at least 1, got {self.max_num}"),
            (set(self.methods) <= {"ddim", "ddpm"} and bool(self.methods), "--methods takes ddim and/or ddpm"),
            (self.request_timeout_s > 0, "--request-timeout-s must be positive"),
            (self.max_body_bytes >= 1024, "--max-body-bytes must be at least 1024"),
            (self.token_file is None or os.path.isfile(self.token_file), f"--token-file {self.token_file}: no file"),
        ]
        return [message for ok, message in checks if not ok]


def add_flags(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(ServeSettings):
        parser.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, help=field.metadata["help"], **field.metadata["flag"]
        )
    parser.set_defaults(**{f.name: f.default for f in dataclasses.fields(ServeSettings)})


def from_args(args: argparse.Namespace) -> ServeSettings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)}
    values["methods"], values["cors_origins"] = tuple(values["methods"]), tuple(values["cors_origins"])
    return ServeSettings(**values)
