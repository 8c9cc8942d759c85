"""The LitServe anchor of bench/serve.py (started by it as a subprocess, stopped by it by PID).

    .venv/bin/python bench/anchors/litserve_app.py --port 8001 [--model efficientnet_lite0] [--threads 1] \\
        [--batch 16] [--wait 0.01]

The vfm runner behind LitServe's own batching (``max_batch_size``, ``batch_timeout``), one inference worker on
CPU, one API server: POST /predict with a JSON body ``{"image": "<base64 of the image file>"}`` answers
``{"predictions": [...]}`` (top-5), as vfm's predict does. JSON because LitServe hands its inference process the
parsed request, and a raw body cannot cross to it.
"""
from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

import litserve as ls

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TOP_K = 5


class VfmRunnerAPI(ls.LitAPI):
    def __init__(self, model: str, threads: int, **kwargs) -> None:  # noqa: ANN003 (LitAPI's batching options)
        super().__init__(**kwargs)
        self.model, self.threads = model, threads

    def setup(self, device: str) -> None:
        from vfm.models import load_model
        from vfm.models.backends.torch import set_threads

        set_threads(self.threads)
        self.runner = load_model(self.model, device="cpu")
        self.runner.warmup()

    def decode_request(self, request):  # noqa: ANN001,ANN201 (no annotation: LitServe parses the JSON body)
        from vfm.models import decode_image

        return decode_image(base64.b64decode(request["image"]))

    def batch(self, inputs):  # noqa: ANN001,ANN201 (a list, not LitServe's default np.stack)
        return list(inputs)

    def predict(self, images):  # noqa: ANN001,ANN201
        return [c.to_json() for c in self.runner.classify(list(images), top_k=TOP_K)]

    def unbatch(self, output):  # noqa: ANN001,ANN201
        return list(output)

    def encode_response(self, output):  # noqa: ANN001,ANN201 (already {"predictions": [...]}, as vfm answers)
        return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--wait", type=float, default=0.01)
    args = parser.parse_args()
    api = VfmRunnerAPI(args.model, args.threads, max_batch_size=args.batch, batch_timeout=args.wait)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
