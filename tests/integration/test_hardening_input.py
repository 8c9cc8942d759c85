"""Bad input on every image route, in options and prompts, in names, and on the CLI: each case gets its
DESIGN error (status and type, the `{"error": {type, message}}` body, no traceback), and the same route
answers the next good request. test_errors.py holds one of each status; this is the wide sweep."""
from __future__ import annotations

import base64
import json
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlencode

import numpy as np
import pytest

from vfm.models.heads import KNNHead, save_head
from vfm.service.client import VfmClient
from vfm.cli import main as vfm_main

from conftest import BASE_SETTINGS
from hardening_tools import (PNG_HEADERS, chunked, declared_png, encoded, memory_kb, noise, raw_request,
                             replica_pids)
from test_errors import assert_error

MAX_BODY = BASE_SETTINGS["limits"]["max_body_bytes"]
JSON_HEADERS = {"Content-Type": "application/json"}
HEAD = "hardening_knn"
SEGMENT_PROMPT = {"points": "[[5, 5]]", "point_labels": "[1]"}

# Every route that takes an image, on a tiny model: path and the query a good request needs.
IMAGE_ROUTES: dict[str, tuple[str, dict[str, str]]] = {
    "classify": ("/v1/models/tiny_cnn/predict", {}),
    "detect": ("/v1/models/tiny_detector/predict", {}),
    "embed": ("/v1/models/tiny_vit/embed", {}),
    "encode": ("/v1/models/tiny_sam/encode", {}),
    "segment": ("/v1/models/tiny_sam/segment", SEGMENT_PROMPT),
    "head": (f"/v1/heads/{HEAD}/predict", {}),
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bad_bodies() -> dict[str, tuple[int, str, Callable[[], dict[str, Any]]]]:
    """Bad bodies: id -> (status, error type, httpx keyword arguments)."""
    good_png = encoded(noise(40, 50), "PNG")
    jpeg = encoded(noise(60, 90), "JPEG")
    return {
        "empty-body": (400, "missing_image", lambda: {"content": b"", "headers": PNG_HEADERS}),
        "non-image-bytes": (415, "not_an_image", lambda: {"content": b"%PDF-1.7 a document" * 20,
                                                          "headers": PNG_HEADERS}),
        "truncated-jpeg": (400, "corrupt", lambda: {"content": jpeg[: len(jpeg) // 2],
                                                    "headers": {"Content-Type": "image/jpeg"}}),
        "truncated-png": (400, "corrupt", lambda: {"content": good_png[: len(good_png) // 2], "headers": PNG_HEADERS}),
        "png-declaring-50000x50000": (413, "too_many_pixels", lambda: {"content": declared_png(50_000, 50_000),
                                                                      "headers": PNG_HEADERS}),
        "body-over-limit": (413, "payload_too_large", lambda: {"content": b"\0" * (MAX_BODY + 1),
                                                               "headers": PNG_HEADERS}),
        "wrong-content-type": (415, "unsupported_media_type", lambda: {"content": good_png,
                                                                       "headers": {"Content-Type": "text/csv"}}),
        "invalid-base64": (400, "bad_request", lambda: {"json": {"image": "iVBOR*not base64*"}}),
        "base64-of-text": (415, "not_an_image", lambda: {"json": {"image": _b64(b"just some text")}}),
        "image-a-number": (400, "bad_request", lambda: {"json": {"image": 12345}}),
        "invalid-json": (400, "bad_request", lambda: {"content": b'{"image": "iVBOR', "headers": JSON_HEADERS}),
        "json-nested-too-deeply": (400, "bad_request", lambda: {"content": b"[" * 50_000 + b"]" * 50_000,
                                                                "headers": JSON_HEADERS}),
        "json-in-utf16-garbage": (400, "bad_request", lambda: {"content": b"\xff\xfe{\x00", "headers": JSON_HEADERS}),
        "multipart-without-boundary": (400, "bad_request", lambda: {
            "content": b"--x\r\n\r\n", "headers": {"Content-Type": "multipart/form-data"}}),
        "multipart-truncated-png": (400, "corrupt", lambda: {"files": {"image": ("a.png", good_png[:200])}}),
    }


BODY_IDS = list(bad_bodies())


@pytest.fixture(scope="module")
def head(client_module: VfmClient, heads_dir: Path, api_key: str, random_pngs) -> Iterator[str]:
    """A k-NN head over tiny_cnn, loaded for this module (and removed after it)."""
    images = random_pngs(2, seed=70)
    features = np.asarray([client_module.embed("tiny_cnn", image)["embedding"] for image in images], np.float32)
    save_head(KNNHead(["a", "b"], features, np.arange(2), k=1), heads_dir / HEAD,
              {"backbone": "tiny_cnn", "embed": {"normalize": False}})
    reload = {"Authorization": f"Bearer {api_key}"}
    assert client_module.http.post("/v1/admin/heads/reload", headers=reload).json()["loaded"] == 1
    yield HEAD
    shutil.rmtree(heads_dir / HEAD)
    client_module.http.post("/v1/admin/heads/reload", headers=reload).raise_for_status()


@pytest.fixture(scope="module")
def client_module(service_url: str) -> Iterator[VfmClient]:
    with VfmClient(service_url, timeout=60) as c:
        yield c


def good_request(client: VfmClient, route: str, image: bytes) -> dict[str, Any]:
    path, query = IMAGE_ROUTES[route]
    response = client.http.post(path, params=query, content=image, headers=PNG_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("body_id", BODY_IDS)
@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_a_bad_body_on_every_image_route(client: VfmClient, head: str, small_png: bytes, route: str,
                                         body_id: str) -> None:
    status, kind, kwargs = bad_bodies()[body_id]
    path, query = IMAGE_ROUTES[route]
    response = client.http.post(path, params=query, **kwargs())
    assert_error(response, status, kind)
    assert response.headers["X-Request-ID"]
    good_request(client, route, small_png)


# ---- options and prompts ------------------------------------------------------------------

def _json_body(image: bytes, fields: str) -> dict[str, Any]:
    """A JSON body written as text, so NaN, Infinity and 1e400 reach the server as sent."""
    return {"content": ('{"image": "%s", %s}' % (_b64(image), fields)).encode(), "headers": JSON_HEADERS}


OPTION_CASES: list[tuple[str, str, str, dict[str, str] | None, str]] = [
    # id, route, JSON fields (or "" with a query), query, a word the message must hold
    ("top_k-nan", "classify", '"top_k": NaN', None, "top_k"),
    ("top_k-infinity", "classify", '"top_k": Infinity', None, "top_k"),
    ("top_k-minus-infinity", "classify", '"top_k": -Infinity', None, "top_k"),
    ("top_k-1e400", "classify", '"top_k": 1e400', None, "top_k"),
    ("top_k-10e40", "classify", '"top_k": 1' + "0" * 40, None, "limit"),
    ("top_k-negative", "classify", '"top_k": -3', None, "top_k"),
    ("top_k-a-word", "classify", '"top_k": "many"', None, "top_k"),
    ("top_k-nan-in-query", "classify", "", {"top_k": "NaN"}, "top_k"),
    ("top_k-huge-in-query", "classify", "", {"top_k": "9" * 5000}, "top_k"),
    ("top_k-list-nested-deeply-in-query", "classify", "", {"top_k": "[" * 5000 + "]" * 5000}, "top_k"),
    ("score_threshold-nan", "detect", '"score_threshold": NaN', None, "score_threshold"),
    ("score_threshold-infinity", "detect", '"score_threshold": Infinity', None, "score_threshold"),
    ("iou_threshold-1e308", "detect", '"iou_threshold": 1e308', None, "iou_threshold"),
    ("max_detections-1e400", "detect", '"max_detections": 1e400', None, "max_detections"),
    ("max_detections-10e40", "detect", '"max_detections": 1' + "0" * 40, None, "limit"),
    ("max_detections-negative", "detect", '"max_detections": -1', None, "max_detections"),
    ("normalize-nan", "embed", '"normalize": NaN', None, "normalize"),
    ("head-top_k-negative", "head", '"top_k": -1', None, "top_k"),
    ("head-top_k-1e400", "head", '"top_k": 1e400', None, "top_k"),
    ("head-top_k-10e40", "head", '"top_k": 1' + "0" * 40, None, "limit"),
    ("point-nan", "segment", '"points": [[NaN, 5]], "point_labels": [1]', None, "finite"),
    ("point-infinity", "segment", '"points": [[5, Infinity]], "point_labels": [1]', None, "finite"),
    ("point-1e308", "segment", '"points": [[1e308, 5]], "point_labels": [1]', None, "outside"),
    ("point-negative", "segment", '"points": [[-1, 5]], "point_labels": [1]', None, "outside"),
    ("point-below-the-image", "segment", '"points": [[5, 60.5]], "point_labels": [1]', None, "outside"),
    ("point-nan-in-query", "segment", "", {"points": "[[NaN, 2]]", "point_labels": "[1]"}, "finite"),
    ("point-label-2", "segment", '"points": [[5, 5]], "point_labels": [2]', None, "point_labels"),
    ("point-label-nan", "segment", '"points": [[5, 5]], "point_labels": [NaN]', None, "point_labels"),
    ("too-many-points", "segment", '"points": %s, "point_labels": %s' % ([[1, 1]] * 9, [1] * 9), None, "at most 8"),
    ("box-infinity", "segment", '"box": [0, 0, Infinity, 5]', None, "finite"),
    ("box-minus-1e400", "segment", '"box": [-1e400, 0, 5, 5]', None, "finite"),
    ("box-outside", "segment", '"box": [500, 500, 600, 600]', None, "no part"),
    ("box-inverted", "segment", '"box": [30, 30, 10, 10]', None, "x0 < x1"),
    ("box-three-numbers", "segment", '"box": [1, 2, 3]', None, "box"),
    ("prompt-with-nan-in-a-list", "segment", '"prompts": [{"box": [0, 0, 5, 5]}, {"points": [[NaN, 1]], '
                                             '"point_labels": [1]}]', None, "finite"),
    ("prompts-empty", "segment", '"prompts": []', None, "empty"),
    ("prompts-not-a-list", "segment", '"prompts": {"box": [0, 0, 5, 5]}', None, "prompts"),
    ("multimask-nan", "segment", '"points": [[5, 5]], "point_labels": [1], "multimask": NaN', None, "multimask"),
    ("mask-format-unknown", "segment", '"points": [[5, 5]], "point_labels": [1], "format": "jpeg"', None, "format"),
    ("image_id-traversal", "segment", '"image_id": "../../etc/passwd", "box": [0, 0, 5, 5]', None, "image_id"),
    ("image_id-upper-case", "segment", '"image_id": "%s", "box": [0, 0, 5, 5]' % ("AB" * 32), None, "image_id"),
    ("image_id-63-chars", "segment", '"image_id": "%s", "box": [0, 0, 5, 5]' % ("a" * 63), None, "image_id"),
    ("unknown-option", "segment", '"pointz": [[5, 5]]', None, "did you mean points"),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_options_and_prompts_are_422(client: VfmClient, head: str, small_png: bytes,
                                         case: tuple[str, str, str, dict[str, str] | None, str]) -> None:
    _, route, fields, query, says = case
    path, _ = IMAGE_ROUTES[route]
    if query is None:
        response = client.http.post(path, **_json_body(small_png, fields))
    else:
        response = client.http.post(path, params=query, content=small_png, headers=PNG_HEADERS)
    assert_error(response, 422, "invalid_options", says)
    good_request(client, route, small_png)


def test_an_image_id_that_is_not_the_image_sent_is_400(client: VfmClient, small_png: bytes) -> None:
    response = client.http.post("/v1/models/tiny_sam/segment", params={**SEGMENT_PROMPT, "image_id": "0" * 64},
                                content=small_png, headers=PNG_HEADERS)
    assert_error(response, 400, "bad_request", "not the sha256")
    good_request(client, "segment", small_png)


def test_an_image_the_model_cannot_process_is_422_not_500(client: VfmClient, small_png: bytes) -> None:
    # 1 x 2000 pixels decodes fine, but the detector's resize would make it 0 x 320: the runner raises.
    thin = encoded(noise(1, 2000), "PNG")
    response = client.http.post("/v1/models/tiny_detector/predict", content=thin, headers=PNG_HEADERS)
    body = assert_error(response, 422, "unprocessable_image", "tiny_detector")
    assert response.headers["X-Request-ID"] in body["error"]["message"]
    segment = client.http.post("/v1/models/tiny_sam/segment", params=SEGMENT_PROMPT, content=thin,
                               headers=PNG_HEADERS)
    assert_error(segment, 422, "invalid_options")
    good_request(client, "detect", small_png)


# ---- names --------------------------------------------------------------------------------

ODD_NAMES = {
    "traversal-encoded-slashes": "..%2F..%2F..%2Fetc%2Fpasswd",
    "traversal-encoded-dots": "%2E%2E/%2E%2E/etc/passwd",
    "nul-byte": "tiny_cnn%00",
    "right-to-left-override": "%E2%80%AEnnc_ynit",
    "emoji": "%F0%9F%98%80",
    "overlong-utf8-dot": "%C0%AE%C0%AE",
    "invalid-utf8": "%FF%FE",
    "newline-injection": "tiny_cnn%0D%0AX-Injected:%201",  # no route matches a name with a line break
    "very-long": "m" * 4000,
    "spaces": "tiny%20cnn",
}
NAME_ROUTES = {
    "model-info": ("GET", "/v1/models/{}", "unknown_model"),
    "predict": ("POST", "/v1/models/{}/predict", "unknown_model"),
    "embed": ("POST", "/v1/models/{}/embed", "unknown_model"),
    "encode": ("POST", "/v1/models/{}/encode", "unknown_model"),
    "segment": ("POST", "/v1/models/{}/segment", "unknown_model"),
    "head-predict": ("POST", "/v1/heads/{}/predict", "unknown_head"),
}


@pytest.mark.parametrize("name_id", list(ODD_NAMES))
@pytest.mark.parametrize("route", list(NAME_ROUTES))
def test_odd_and_traversing_names_are_404(client: VfmClient, small_png: bytes, route: str, name_id: str) -> None:
    method, template, kind = NAME_ROUTES[route]
    response = client.http.request(method, template.format(ODD_NAMES[name_id]), content=small_png,
                                   headers=PNG_HEADERS)
    assert_error(response, 404, "not_found" if name_id == "newline-injection" else kind)
    assert "root:" not in response.text and "X-Injected" not in response.headers
    good_request(client, "classify", small_png)


# ---- bodies over the limit: refused before they are read ------------------------------------

@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_a_declared_oversize_body_is_413_before_any_of_it_is_sent(service_url: str, client: VfmClient, head: str,
                                                                  small_png: bytes, route: str) -> None:
    path, query = IMAGE_ROUTES[route]
    target = path + ("?" + urlencode(query) if query else "")
    answer = raw_request(service_url, (f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                       f"Content-Type: image/png\r\nContent-Length: {10 ** 12}\r\n\r\n").encode(),
                         timeout_s=30)
    assert answer.status == 413, answer.head
    assert json.loads(answer.body)["error"]["type"] == "payload_too_large"
    good_request(client, route, small_png)


def test_a_streamed_body_is_cut_at_the_limit(service_url: str, client: VfmClient, small_png: bytes) -> None:
    # 1 GiB, chunked (no length to check first), paced at 128 MiB/s: the answer must come before the end.
    total = 1 << 30
    answer = raw_request(service_url, b"POST /v1/models/tiny_cnn/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n",
                         chunked(total), pace_bytes_per_s=128 << 20, timeout_s=30)
    assert answer.status == 413, answer.head
    assert json.loads(answer.body)["error"]["type"] == "payload_too_large"
    assert answer.body_bytes_sent < total
    good_request(client, "classify", small_png)


def test_an_extreme_aspect_ratio_costs_no_more_memory_than_a_photo(client: VfmClient, chelsea_jpeg: bytes) -> None:
    # 1 x 20000 pixels (a 200-byte PNG) used to be scaled to 256 x 5,120,000 before the centre crop: 4 GB.
    [pid] = replica_pids("efficientnet_lite0")
    client.predict("efficientnet_lite0", chelsea_jpeg)
    peak = memory_kb(pid, "VmHWM")
    for shape in ((1, 20_000), (20_000, 1)):
        answer = client.predict("efficientnet_lite0", encoded(np.zeros((*shape, 3), np.uint8), "PNG"), top_k=1)
        assert len(answer["predictions"]) == 1
    assert memory_kb(pid, "VmHWM") - peak < 256 * 1024, "the replica's peak memory grew by more than 256 MB"


# ---- the CLI against the live service -------------------------------------------------------

def test_cli_bad_input_against_the_service_is_one_line(service_url: str, tmp_path: Path, small_png: bytes,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    files = {"text.jpg": b"not an image at all", "huge.png": b"\0" * (MAX_BODY + 1),
             "thin.png": encoded(noise(1, 2000), "PNG"), "ok.png": small_png}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    cases = [  # argv, exit code, words the one line must hold
        (["tiny_cnn", "text.jpg"], 1, ["415", "not_an_image"]),
        (["tiny_cnn", "huge.png"], 1, ["413", "payload_too_large"]),
        (["tiny_cnn", "ok.png", "--top-k", "1000"], 1, ["422", "limit of 20"]),
        (["tiny_detector", "thin.png"], 1, ["422", "unprocessable_image"]),
        (["tiny_sam", "ok.png", "--task", "segment", "--point", "1e6,5"], 1, ["422", "outside"]),
        (["tiny_sam", "ok.png", "--task", "segment", "--box", "0,0,inf,5"], 2, ["--box"]),
        (["tiny_cnn", "no-such-file.png"], 1, ["no-such-file.png"]),
        (["%2E%2E%2Fetc%2Fpasswd", "ok.png"], 1, ["404", "unknown_model"]),
    ]
    for argv, code, words in cases:
        argv = [str(tmp_path / a) if a in files or a == "no-such-file.png" else a for a in argv]
        assert vfm_main(["predict", "--url", service_url, *argv]) == code, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("vfm: error: ") and "Traceback" not in err, err
        assert all(w in err for w in words), (argv, err)
    assert vfm_main(["predict", "--url", closed, "tiny_cnn", str(tmp_path / "ok.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert vfm_main(["predict", "--url", service_url, "tiny_cnn", str(tmp_path / "ok.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"]

