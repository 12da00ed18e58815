"""``POST /v1/segment`` over real HTTP against the shared local Ray Serve (``conftest.serve_url``).

The segmenter is the ``tiny`` preset with random weights: masks are arbitrary, so the tests check
what must hold for any weights (RLE == PNG labels, bbox/area == mask, cache behaviour, errors).
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from itertools import count

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from serving.schemas import ModelList, SegmenterInfo, SegmentResponse

from .conftest import SEG_H, SEG_W, embedding_cache_bytes, embedding_entry_bytes

_seed = count(1)


def _png(seed: int | None = None, width: int = SEG_W, height: int = SEG_H) -> bytes:
    """A small PNG with two shapes; each ``seed`` gives different pixels (so a different image_id)."""
    seed = next(_seed) if seed is None else seed
    im = Image.new("RGB", (width, height), (90, 100, (seed * 37) % 256))
    draw = ImageDraw.Draw(im)
    draw.ellipse((10, 10, 50, 50), fill=(220, 30, 30))
    draw.rectangle((55, 30, 90, 70), fill=(30, 40, 200))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(serve_url: str) -> httpx.Client:
    with httpx.Client(base_url=serve_url, timeout=60.0) as c:
        yield c


def _segment(client: httpx.Client, image: bytes | None = None, query_output: str | None = None,
             **body: object) -> httpx.Response:
    """JSON ``POST /v1/segment``; ``query_output`` goes to ``?output=``, ``body`` keys to the JSON body."""
    if image is not None:
        body["image_b64"] = base64.b64encode(image).decode()
    return client.post("/v1/segment", json=body, params={"output": query_output} if query_output else None)


def _segmenter_info(client: httpx.Client) -> SegmenterInfo:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    (info,) = [m for m in ModelList.model_validate(r.json()).models if isinstance(m, SegmenterInfo)]
    return info


def _label_image(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (SEG_W, SEG_H)
        return np.asarray(im)


BOXES = [[5, 5, 55, 55], [50, 25, 95, 75], [0, 0, 96, 80]]


def test_json_rle_bbox_area_agree_with_the_mask_png(client: httpx.Client) -> None:
    image = _png()
    r = _segment(client, image, boxes=BOXES)
    assert r.status_code == 200, r.text
    resp = SegmentResponse.model_validate(r.json())
    assert (resp.width, resp.height, resp.mode, resp.model) == (SEG_W, SEG_H, "boxes", "sam-tiny")
    assert sorted(m.prompt_index for m in resp.masks) == [0, 1, 2]  # one mask per box
    scores = [m.score for m in resp.masks]
    assert scores == sorted(scores, reverse=True)
    # The same image by image_id, as a PNG label image: label i + 1 is masks[i], pixel for pixel.
    png = _segment(client, image_id=resp.image_id, boxes=BOXES, query_output="mask")
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png" and png.headers["x-embedding-cache"] == "hit"
    label = _label_image(png.content)
    assert set(np.unique(label)) <= {0, 1, 2, 3}
    for i, m in enumerate(resp.masks):
        decoded = mask_utils.decode({"size": list(m.segmentation.size),
                                     "counts": m.segmentation.counts.encode()}).astype(bool)
        assert np.array_equal(decoded, label == i + 1), f"mask {i}"
        assert m.area == int(decoded.sum())
        if m.area:
            ys, xs = np.nonzero(decoded)
            assert m.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert m.polygon and all(len(p) % 2 == 0 and len(p) >= 6 for p in m.polygon)
        assert 0.0 <= m.stability_score <= 1.0
    assert sum(m.area for m in resp.masks) == int((label > 0).sum())
    assert (label > 0).any(), "random weights still give some non-empty mask for a whole-image box"


def test_a_second_prompt_on_the_same_image_skips_the_encoder(client: httpx.Client) -> None:
    image = _png()
    runs = _segmenter_info(client).encoder_runs
    first = _segment(client, image, points=[[30, 30]], labels=[1])
    assert first.status_code == 200, first.text
    assert first.json()["cache_hit"] is False and first.json()["mode"] == "points"
    assert _segmenter_info(client).encoder_runs == runs + 1
    again = _segment(client, image, points=[[70, 50], [20, 20]], labels=[1, 0])  # the image sent again
    by_id = _segment(client, image_id=first.json()["image_id"], points=[[70, 50]], labels=[1])
    for r in (again, by_id):
        assert r.status_code == 200, r.text
        assert r.json()["cache_hit"] is True and r.json()["image_id"] == first.json()["image_id"]
    assert _segmenter_info(client).encoder_runs == runs + 1


def test_the_cache_stays_within_its_byte_bound(client: httpx.Client) -> None:
    ids = []
    for _ in range(3):  # room for two images: the third evicts the least recently used
        r = _segment(client, _png(), points=[[10, 10]], labels=[1], query_output="mask")
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-image-id"])
    cache = _segmenter_info(client).embedding_cache
    assert cache.capacity_bytes == embedding_cache_bytes()
    assert cache.bytes <= cache.capacity_bytes and cache.entries == 2
    assert cache.bytes == 2 * embedding_entry_bytes()  # exactly the two most recent images
    assert cache.evictions >= 1
    gone = _segment(client, image_id=ids[0], points=[[10, 10]], labels=[1])
    assert gone.status_code == 404, gone.text
    assert f"image_id '{ids[0]}' is not in the embedding cache" in gone.json()["detail"]
    assert _segment(client, image_id=ids[2], points=[[10, 10]], labels=[1]).status_code == 200


def test_concurrent_requests_for_one_new_image_share_one_encoder_run(serve_url: str, client: httpx.Client) -> None:
    image = _png()
    before = _segmenter_info(client)
    points = [[8 + 10 * i, 8 + 8 * i] for i in range(8)]

    def one(i: int) -> dict:
        with httpx.Client(base_url=serve_url, timeout=60.0) as c:
            r = _segment(c, image, points=[points[i]], labels=[1])
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, range(8)))
    assert len({a["image_id"] for a in answers}) == 1
    assert all(len(a["masks"]) == 1 and a["masks"][0]["prompt_index"] == 0 for a in answers)
    after = _segmenter_info(client)
    assert after.encoder_runs == before.encoder_runs + 1
    # All eight wake up together when the one encoder run ends: their prompts are decoded in batches.
    assert after.decoder_requests == before.decoder_requests + 8
    assert after.decoder_batches - before.decoder_batches <= 2  # 1 in every probe run


def test_automatic_mode_segments_everything(client: httpx.Client) -> None:
    r = _segment(client, _png(), pred_iou_thresh=0.0, stability_score_thresh=0.0, points_per_side=4,
                 max_masks=5)
    assert r.status_code == 200, r.text
    resp = SegmentResponse.model_validate(r.json())
    assert resp.mode == "automatic" and 1 <= len(resp.masks) <= 5
    for m in resp.masks:
        assert m.prompt_index is None and m.point is not None and m.area > 0  # empty segments are dropped
        x, y = m.point
        assert 0 <= x <= SEG_W and 0 <= y <= SEG_H
    label = _label_image(_segment(client, image_id=resp.image_id, query_output="mask", pred_iou_thresh=0.0,
                                  stability_score_thresh=0.0, points_per_side=4, max_masks=5).content)
    assert int(label.max()) == len(resp.masks)


def test_multipart_with_prompts_field_and_blended_output(client: httpx.Client) -> None:
    image = _png()
    prompts = json.dumps({"boxes": [BOXES[0]]})
    r = client.post("/v1/segment", files={"image": ("x.png", image, "image/png")}, data={"prompts": prompts})
    assert r.status_code == 200, r.text
    via_json = _segment(client, image, boxes=[BOXES[0]])
    assert r.json()["masks"] == via_json.json()["masks"] and r.json()["image_id"] == via_json.json()["image_id"]
    blended = client.post("/v1/segment", params={"output": "blended"},
                          files={"image": ("x.png", image, "image/png")}, data={"prompts": prompts})
    assert blended.status_code == 200, blended.text
    with Image.open(io.BytesIO(blended.content)) as im, Image.open(io.BytesIO(image)) as original:
        assert im.size == (SEG_W, SEG_H)
        changed = np.asarray(im.convert("RGB")) != np.asarray(original.convert("RGB"))
    area = r.json()["masks"][0]["area"]
    assert (int(changed.any(axis=2).sum()) > 0) == (area > 0)  # the mask is drawn, and only if non-empty


UNKNOWN_ID = "0" * 64
BAD_CASES = [
    ("point outside the image", dict(points=[[10, 10], [200, 5]], labels=[1, 1]), 422,
     f"points[1] = [200, 5] is outside the {SEG_W}x{SEG_H} image"),
    ("box outside the image", dict(boxes=[[0, 0, 20, 20], [10, -4, 30, 30]]), 422,
     f"boxes[1] = [10, -4, 30, 30] does not fit the {SEG_W}x{SEG_H} image"),
    ("degenerate box", dict(boxes=[[30, 10, 20, 40]]), 422, "need 0 <= x_min < x_max"),
    ("point with three numbers", dict(points=[[1, 2, 3]], labels=[1]), 422, "body.points.0"),
    ("box with three numbers", dict(boxes=[[1, 2, 3]]), 422, "body.boxes.0"),
    ("labels do not match points", dict(points=[[1, 2], [3, 4]], labels=[1]), 422,
     "labels has 1 entries but points has 2"),
    ("points without labels", dict(points=[[1, 2]]), 422, "need 'labels'"),
    ("label not 0 or 1", dict(points=[[1, 2]], labels=[3]), 422, "body.labels.0"),
    ("points with two boxes", dict(points=[[1, 2]], labels=[1], boxes=[[0, 0, 5, 5], [1, 1, 6, 6]]), 422,
     "points can refine one box only"),
    ("unknown output form in the body", dict(points=[[1, 2]], labels=[1], output="svg"), 422, "body.output"),
]


@pytest.mark.parametrize(("case", "prompts", "status", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_prompts_are_a_4xx_with_detail(client: httpx.Client, case: str, prompts: dict, status: int,
                                           message: str) -> None:
    r = _segment(client, _png(seed=0), **prompts)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["detail"], r.json()["detail"]


OTHER_BAD = [
    ("unknown image_id", lambda c: _segment(c, image_id=UNKNOWN_ID, points=[[1, 2]], labels=[1]), 404,
     f"image_id '{UNKNOWN_ID}' is not in the embedding cache"),
    ("malformed image_id", lambda c: _segment(c, image_id="not-a-hash"), 422, "body.image_id"),
    ("unknown output form in the query", lambda c: _segment(c, _png(seed=0), query_output="gif"), 422,
     "query.output"),
    ("no image", lambda c: _segment(c, points=[[1, 2]], labels=[1]), 422, "no image: send the image"),
    ("image and image_id", lambda c: _segment(c, _png(seed=0), image_id=UNKNOWN_ID), 422,
     "send the image or an image_id, not both"),
    ("not an image", lambda c: client_post_file(c, b"definitely not a png"), 400, "not a recognised image"),
    ("unknown multipart field", lambda c: c.post("/v1/segment", files={"image": ("x.png", _png(0), "image/png")},
                                                 data={"prompt": "{}"}), 422, "unknown multipart field(s) ['prompt']"),
    ("prompts not JSON", lambda c: c.post("/v1/segment", files={"image": ("x.png", _png(0), "image/png")},
                                          data={"prompts": "points=1,2"}), 422, "form.prompts"),
    ("text body", lambda c: c.post("/v1/segment", content=b"x", headers={"content-type": "text/plain"}), 415,
     "unsupported content type 'text/plain'"),
]


def client_post_file(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/v1/segment", files={"image": ("x.png", data, "image/png")})


@pytest.mark.parametrize(("case", "send", "status", "message"), OTHER_BAD, ids=[c[0] for c in OTHER_BAD])
def test_bad_requests_are_a_4xx_with_detail(client: httpx.Client, case: str, send, status: int,
                                            message: str) -> None:
    r = send(client)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"], r.json()["detail"]


def test_still_serving_after_bad_input_and_models_lists_both(client: httpx.Client) -> None:
    assert _segment(client, _png(seed=0), points=[[500, 1]], labels=[1]).status_code == 422
    r = _segment(client, _png(seed=0), points=[[5, 5]], labels=[1])
    assert r.status_code == 200, r.text
    tasks = {m["name"]: m["task"] for m in client.get("/v1/models").json()["models"]}
    assert tasks == {"shapes-nano": "detection", "sam-tiny": "segmentation"}
    info = _segmenter_info(client)
    assert (info.preset, info.input_size, info.precision) == ("tiny", 128, "float")
    spec = client.get("/openapi.json").json()["paths"]["/v1/segment"]["post"]
    assert {"400", "404", "413", "422", "503"} <= set(spec["responses"])
