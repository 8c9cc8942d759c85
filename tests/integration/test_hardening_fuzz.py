"""Fuzzing: schemathesis generates requests from the running service's own /openapi.json (valid ones and
ones that break the schema) for every operation, against real models; not one answer is a 5xx, and every
error has the DESIGN body. The budget is small in `make test`; `make fuzz` raises it (VFM_FUZZ_EXAMPLES)."""
from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
import requests

from vfm.service.client import VfmClient
from vfm.service.routes import ROUTES

EXAMPLES = int(os.environ.get("VFM_FUZZ_EXAMPLES", "8"))      # per operation, per generation mode
SEED = int(os.environ.get("VFM_FUZZ_SEED", "20261125"))
# Served models each model route is also fuzzed on (besides generated names). Left out on purpose:
# sam_vit_b (unavailable: 503 by design), test/slow_cnn and hardening/* (503/504 by design).
MODELS_BY_ROUTE = {"predict": ["tiny_cnn", "tiny_detector"], "embed": ["tiny_vit"], "encode": ["tiny_sam"],
                   "segment": ["tiny_sam"], "detect-segment": ["tiny_sam"]}


def _with_image(image: bytes) -> Any:
    """A case whose image (in whichever transport it uses) is a real one, so generated options reach the
    option parser and the model instead of stopping at the image check."""
    import base64

    def put(case: Any) -> Any:
        media = case.media_type or ""
        if media.startswith("image/"):
            case.body = image
        elif isinstance(case.body, dict) and media == "application/json":
            case.body = {**case.body, "image": base64.b64encode(image).decode()}
        elif isinstance(case.body, dict) and media == "multipart/form-data":
            case.body = {**case.body, "image": image}
        return case

    return put


def _route(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _check(case: Any, response: Any, seen: Counter) -> None:
    path, status = case.operation.path, response.status_code
    seen[(case.operation.method.upper(), path, status)] += 1
    where = f"{case.operation.method.upper()} {case.formatted_path} -> {status}: {response.text[:300]}"
    assert status < 500, where
    if status >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, where
        assert "Traceback" not in response.text, where


@pytest.mark.timeout(900)
def test_fuzzing_the_openapi_schema_finds_no_server_error(service_url: str, client: VfmClient,
                                                          small_png: bytes) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{service_url}/openapi.json", timeout=30)
    session = requests.Session()
    seen: Counter = Counter()
    fuzzed = []
    for result in schema.get_all_operations():
        operation = result.ok()
        fixed = [{}]
        if "{name}" in operation.path and operation.path.startswith("/v1/models/"):
            fixed += [{"name": m} for m in MODELS_BY_ROUTE.get(_route(operation.path), [])]
        strategies = [operation.as_strategy(generation_mode=mode, path_parameters=params or None)
                      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) for params in fixed]
        if operation.body:  # the image routes: also with a real image in the generated request
            strategies += [s.map(_with_image(small_png)) for s in strategies]

        @seed(SEED)
        @settings(max_examples=EXAMPLES * len(strategies), database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(strategies))
        def fuzz(case: Any) -> None:
            response = case.call(base_url=service_url, session=session, timeout=60)
            _check(case, response, seen)

        fuzz()
        fuzzed.append(f"{operation.method.upper()} {operation.path}")
    assert len(fuzzed) == len(ROUTES), fuzzed  # every route of the API table was fuzzed
    total = sum(seen.values())
    statuses: Counter = Counter()
    for (_, _, status), n in seen.items():
        statuses[status] += n
    print(f"\nfuzz: {total} requests over {len(fuzzed)} operations, statuses {dict(sorted(statuses.items()))}")
    assert total >= len(fuzzed) * EXAMPLES
    assert client.predict("tiny_cnn", small_png)["predictions"]
