"""HTTP latency of a running service: p50/p95 of GET /search and POST /annotate under load,
and optionally of uploads (POST /artworks).

    python -m bench.http --url http://127.0.0.1:8000 --clients 8 --requests 200 [--json PATH]
    artalign bench http --url http://127.0.0.1:8000 --uploads 32 --api-key KEY

``--clients`` concurrent clients (httpx, asyncio) share a bounded number of requests per
endpoint. Queries are phrases of the served artworks (from GET /artworks/{id}), crops are cut
from their images (GET /artworks/{id}/image), so the service does real work on each call.
Answers other than 200 are counted, never timed as successes (a 503 from the inference limit
shows up as ``refused``). Prints a table and JSON.

``--uploads N`` also posts N new artworks twice, from one client and then from ``--clients``
clients (images are the sampled ones, cropped and flipped at random, differently on every
run, so each is new and goes through the detector), and reports the ratio of the two throughputs: how far uploads overlap. They are
deleted again afterwards.
"""

from __future__ import annotations

import argparse
import io
import random
import time
from collections.abc import Awaitable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from bench.load import EndpointResult, load_requests, new_image
from bench.report import add_json_argument, publish, require_positive, run_as_main

if TYPE_CHECKING:  # asyncio, httpx and PIL load inside the functions: `artalign --help` imports this module
    import httpx


async def _sample_inputs(client: httpx.AsyncClient, artworks: int, seed: int
                         ) -> tuple[list[str], list[bytes], list[Any]]:
    """Phrases to search for, JPEG crops to annotate and the images, from up to ``artworks``
    artworks."""
    from PIL import Image

    page = (await client.get("/artworks", params={"limit": artworks})).raise_for_status().json()
    if not page["items"]:
        raise SystemExit("the service holds no artworks: ingest some first (or run `artalign demo`)")
    rng = random.Random(seed)
    phrases: list[str] = []
    crops: list[bytes] = []
    images: list[Any] = []
    for item in page["items"]:
        detail = (await client.get(f"/artworks/{item['id']}")).raise_for_status().json()
        phrases.extend(detail["phrases"])
        image_bytes = (await client.get(item["image_url"])).raise_for_status().content
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        images.append(image)
        for fragment in detail["fragments"]:
            if fragment["source"] in ("annotation", "extracted"):
                buffer = io.BytesIO()
                image.crop(tuple(int(v) for v in fragment["box"])).save(buffer, "JPEG")
                crops.append(buffer.getvalue())
    rng.shuffle(phrases)
    rng.shuffle(crops)
    if not phrases or not crops:
        raise SystemExit("the served artworks have no phrases or no fragments to crop")
    return phrases, crops, images


async def run(url: str, *, clients: int, requests: int, artworks: int, seed: int,
              timeout: float, uploads: int = 0, api_key: str | None = None) -> list[EndpointResult]:
    import json

    import httpx

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        phrases, crops, images = await _sample_inputs(client, artworks, seed)

        def search(index: int) -> Awaitable[httpx.Response]:
            return client.get("/search", params={"q": phrases[index % len(phrases)], "limit": 10})

        def annotate(index: int) -> Awaitable[httpx.Response]:
            files = {"image": ("crop.jpg", crops[index % len(crops)], "image/jpeg")}
            return client.post("/annotate", files=files, params={"limit": 10})

        # one warm-up call each, so first-call costs (lazy imports, caches) are not measured
        await search(0)
        await annotate(0)
        results = [
            await load_requests(client, "GET /search", requests, clients, search),
            await load_requests(client, "POST /annotate", requests, clients, annotate),
        ]
        if uploads:
            # New images on every run: the feature store keeps an image's regions after its
            # artwork is deleted, so an image uploaded before would skip the detector.
            tag = f"bench-upload-{time.time_ns()}"
            rng = random.Random(tag)
            bodies = [new_image(images[i % len(images)], rng) for i in range(2 * uploads)]
            headers = {"X-API-Key": api_key} if api_key else {}

            def upload(index: int) -> Awaitable[httpx.Response]:
                document = {"external_id": f"{tag}-{index}", "title": "benchmark upload",
                            "captions": [phrases[index % len(phrases)]]}
                return client.post("/artworks", headers=headers, data={"artwork": json.dumps(document)},
                                   files={"image": ("upload.png", bodies[index], "image/png")})

            serial = await load_requests(client, "POST /artworks x1", uploads, 1, upload,
                                         ok_status=(201,))
            offset = uploads

            def upload_second(index: int) -> Awaitable[httpx.Response]:
                return upload(offset + index)

            results += [serial, await load_requests(client, f"POST /artworks x{clients}", uploads,
                                                    clients, upload_second, ok_status=(201,))]
            for index in range(2 * uploads):
                await client.delete(f"/artworks/external/{tag}-{index}", headers=headers)
        return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the running service (default %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default %(default)s)")
    parser.add_argument("--requests", type=int, default=200,
                        help="requests per endpoint, shared by the clients (default %(default)s)")
    parser.add_argument("--artworks", type=int, default=20,
                        help="artworks to take queries and crops from (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the inputs (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds per request (default %(default)s)")
    parser.add_argument("--uploads", type=int, default=0,
                        help="also post this many new artworks from 1 client, then as many from "
                             "--clients clients, and delete them after (default 0: none)")
    parser.add_argument("--api-key", default=None,
                        help="X-API-Key for --uploads (the one `artalign demo` prints)")
    add_json_argument(parser)
    from bench import uploads

    uploads.add_arguments(parser.add_argument_group(
        "uploads at size (--stored): the benchmark fills scratch collections and serves them itself"))


def format_table(report: dict[str, Any]) -> str:
    header = f"{'endpoint':<20}{'ok':>6}{'503':>6}{'failed':>8}{'p50 ms':>10}{'p95 ms':>10}{'req/s':>8}"
    lines = [f"{report['url']}, {report['clients']} concurrent clients, {report['requests']} requests "
             "per endpoint", header, "-" * len(header)]
    for r in report["results"]:
        lines.append(f"{r['endpoint']:<20}{r['ok']:>6}{r['refused']:>6}{r['failed']:>8}{r['p50_ms']:>10.1f}"
                     f"{r['p95_ms']:>10.1f}{r['throughput_rps']:>8.2f}")
    if "upload_overlap" in report:
        lines.append(f"uploads from {report['clients']} clients: {report['upload_overlap']:.2f}x the "
                     "throughput of one (1.00 = fully serialised)")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    """Run the benchmark, print the table and the JSON; write the JSON if asked."""
    import asyncio

    import httpx

    if options.stored:
        from bench import uploads

        return uploads.main(options)
    require_positive(options, "clients", "requests", "artworks")
    if options.uploads < 0:
        raise ValueError("--uploads must be 0 or more")
    try:
        results = asyncio.run(run(options.url, clients=options.clients, requests=options.requests,
                                  artworks=options.artworks, seed=options.seed, timeout=options.timeout,
                                  uploads=options.uploads, api_key=options.api_key))
    except httpx.ConnectError as exc:
        raise ValueError(f"--url {options.url}: nothing answers ({exc}); start the service first "
                         "(artalign serve) or point --url at it") from exc
    report = {"benchmark": "http", "url": options.url, "clients": options.clients,
              "requests": options.requests, "results": [asdict(r) for r in results]}
    if options.uploads:
        one, many = results[-2], results[-1]
        if one.ok < options.uploads or many.ok < options.uploads:
            raise ValueError(f"uploads failed ({one.failed + many.failed} of {2 * options.uploads}): "
                             "is --api-key right?")
        report["upload_overlap"] = round(many.throughput_rps / one.throughput_rps, 3)
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.http", __doc__, add_arguments, main)
