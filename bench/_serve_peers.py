"""The peers ``serve_bench`` runs beside gpufleet, each as its own server process:

- ``litserve``: LitServe serving the same runner gpufleet serves (``open_model``, the same
  ``load`` / ``warmup`` / ``predict``), with the runner's batch size and a 5 ms batch window,
  one inference worker on the device, in-memory queues (no durability);
- ``echo``: a bare FastAPI endpoint that returns its body: the floor of any Python HTTP
  server on this machine, and the check that the load generator is not the ceiling.

    python bench/_serve_peers.py litserve --model SPEC --device cpu|cuda --port P [--api N]
    python bench/_serve_peers.py echo --port P [--api N]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import litserve as ls
from fastapi import FastAPI, Request


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        return {"status": "succeeded", "result": await request.json()}

    @app.get("/health")
    async def health() -> str:
        return "ok"

    return app


app = echo_app()  # for uvicorn's workers (an import string)


class RunnerAPI(ls.LitAPI):  # type: ignore[misc]
    """The runner gpufleet serves (``PEER_MODEL``), behind LitServe's batching. At module level:
    LitServe pickles it into its inference worker."""

    def setup(self, device: str) -> None:
        from gpufleet.models.loader import open_model

        self.runner = open_model(os.environ["PEER_MODEL"])
        self.runner.load("cuda:0" if device.startswith("cuda") else "cpu")
        self.runner.warmup()

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # LitServe reads the annotation
        return request["input"]

    def batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    def predict(self, x: Any) -> Any:
        if isinstance(x, list):
            return self.runner.predict(x)
        return self.runner.predict([x])[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return list(output)

    def encode_response(self, output: Any) -> dict[str, Any]:
        return {"status": "succeeded", "result": output}


def litserve(model: str, device: str, port: int, api_servers: int) -> None:
    from gpufleet.models.loader import open_model

    batch = open_model(model).batching.max_batch_size
    api = RunnerAPI(max_batch_size=batch, batch_timeout=0.005)
    server = ls.LitServer(
        api, accelerator="cuda" if device == "cuda" else "cpu", devices=1, workers_per_device=1,
        timeout=60,
    )  # fmt: skip
    server.run(host="127.0.0.1", port=port, num_api_servers=api_servers, log_level="warning",
               generate_client_file=False)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=["litserve", "echo"])
    ap.add_argument("--model", default="")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api", type=int, default=1)
    args = ap.parse_args()
    if args.peer == "echo":
        import uvicorn

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        uvicorn.run("_serve_peers:app", host="127.0.0.1", port=args.port, workers=args.api,
                    log_level="warning", access_log=False)  # fmt: skip
    else:
        litserve(args.model, args.device, args.port, args.api)  # PEER_MODEL set by the bench


if __name__ == "__main__":
    main()
