"""A real Cloud Storage API on localhost for the tests: the PyPI package `gcp-storage-emulator`, in memory, on a free
port, with one bucket. Clients reach it through the variables `environment()` returns: `STORAGE_EMULATOR_HOST`
(gcsfs, google-cloud-storage) and `TENSORSTORE_GCS_HTTP_URL` (tensorstore, hence Orbax's arrays).

One gap of the emulator is filled when it starts (`python tests/gcs_emulator.py PORT`): Cloud Storage answers a
download with the object's generation in an `x-goog-generation` header, which tensorstore reads (Orbax's OCDBT
checkpoints compare generations); the emulator sends none, so the download handler is wrapped to add it."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BUCKET = "yagg-test"


class Emulator:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, __file__, str(self.port)]
        # Its log goes to a file: a pipe nobody reads would fill up and stall the server mid-request.
        self.log = Path(tempfile.mkdtemp(prefix="gcs-emulator-")) / "log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}", timeout=1).read()
                return
            except OSError as e:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    why = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the storage emulator did not start: {why}") from e
                time.sleep(0.1)

    def environment(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            # The emulator serves the JSON API only; gcsfs would otherwise probe each bucket over gRPC first.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def apply(self) -> None:
        """Points this process's clients at the emulator (before any of them has touched gs://)."""
        os.environ.update(self.environment())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _serve(port: int) -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the handler answered 404 already
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    objects.download = download_with_generation  # what `get` calls for ?alt=media, the JSON API's download
    for _, handlers in server.HANDLERS:  # the routes hold the handler functions themselves
        for method, handler in handlers.items():
            if handler is download:
                handlers[method] = download_with_generation
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    emulator.run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
