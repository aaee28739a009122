"""PostgreSQL plans of every statement on the search and upload paths, at a size.

    artalign bench explain --fragments 1000000 [--postgres URL] [--json PATH]

Fills a scratch PostgreSQL database with N fragments, their feature store and saved indexes
(bench/fill.py, then ANALYZE), starts the service in-process on it (its real lifespan and
engine), and records, with a SQLAlchemy ``before_cursor_execute`` listener, every statement
the service sends while answering the search path (GET /search, POST /annotate with a crop,
GET /artworks/{id}) and the upload path (POST /artworks, PUT of the same artwork with
another caption: a replace, DELETE). Each distinct statement is then EXPLAINed with the
parameters it was sent with (the planner's choice and estimates; nothing runs) and the
table shows its plan's root node, whether it reads its tables through an index, the
estimated rows, and any sequential scan of a big table (over BIG_ROWS rows). Statements
without a WHERE clause read a whole table by design (the index manifest's
``database_state`` today): they are marked, not counted as misses. The scratch database is
dropped afterwards.

tests/test_explain.py asserts the same for the hot statements at a smaller size.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.report import add_json_argument, publish, run_as_main

REPO = Path(__file__).resolve().parents[1]
BIG_ROWS = 10_000  # a table with more rows than this must not be read by a sequential scan
INDEX_NODES = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
SCAN_NODES = (*INDEX_NODES, "Seq Scan", "Bitmap Heap Scan")
KEY = "bench-explain-key-0123"


@dataclass
class Recorded:
    """A statement the service sent: the request it served, its SQL and its parameters."""

    request: str
    sql: str
    parameters: Any


@dataclass
class Explained:
    """One distinct statement and what the planner does with it."""

    statement: str  # shortened for the table
    requests: list[str]  # the requests that sent it
    root: str  # the plan's root node
    tables: list[str]  # tables the plan reads
    big_tables: list[str]  # of those, tables over the big-table threshold
    uses_index: bool
    seq_scans: list[str]  # tables read by a sequential scan
    big_seq_scans: list[str]  # of those, tables over BIG_ROWS rows
    rows: float  # the planner's estimate at the root
    whole_table: bool  # no WHERE clause: reads a whole table by design
    sql: str = field(repr=False, default="")

    @property
    def verdict(self) -> str:
        if self.big_seq_scans:
            return "whole table" if self.whole_table else "SEQ SCAN"
        if self.uses_index:
            return "index"
        return "no table" if not self.tables else "small table"


def shorten(sql: str, width: int = 88) -> str:
    """One line: the select list and IN lists elided."""
    text = " ".join(sql.split())
    text = re.sub(r"^SELECT .*? FROM ", "SELECT … FROM ", text)
    mark = r"(?:%\(\w+\)s|\$\d+)(?:::(?:TIMESTAMP WITH TIME ZONE|[A-Z]+))?"  # a placeholder, maybe cast
    text = re.sub(rf"\(\s*{mark}(?:\s*,\s*{mark})+\s*\)", "(…)", text)
    text = re.sub(rf"{mark}", "?", text)
    text = re.sub(r"(VALUES \(.*?\))(?:, \(.*?\))+", r"\1, …", text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _nodes(plan: dict) -> list[dict]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


def summarise(plan: dict, sql: str, requests: list[str], table_rows: dict[str, float],
              big_rows: int = BIG_ROWS) -> Explained:
    """What a plan (EXPLAIN (FORMAT JSON)'s "Plan") does; a table is big over ``big_rows``."""
    nodes = _nodes(plan)
    scans = [n for n in nodes if n["Node Type"] in SCAN_NODES]
    tables = sorted({n["Relation Name"] for n in scans if "Relation Name" in n})
    seq = sorted({n["Relation Name"] for n in scans if n["Node Type"] == "Seq Scan"})
    root = plan["Node Type"] + (f" ({plan['Operation']})" if "Operation" in plan else "")
    return Explained(
        statement=shorten(sql), requests=requests, root=root, tables=tables,
        big_tables=[t for t in tables if table_rows.get(t, 0) > big_rows],
        uses_index=any(n["Node Type"] in INDEX_NODES for n in nodes), seq_scans=seq,
        big_seq_scans=[t for t in seq if table_rows.get(t, 0) > big_rows],
        rows=float(plan.get("Plan Rows", 0)),
        whole_table=sql.lstrip().upper().startswith("SELECT") and not re.search(r"\bWHERE\b", sql, re.I),
        sql=sql,
    )


def explain_all(database_url: str, recorded: list[Recorded], *, big_rows: int = BIG_ROWS
                ) -> list[Explained]:
    """EXPLAIN every distinct recorded statement with its first parameters; a table is big
    over ``big_rows`` rows (the planner's statistics)."""
    from app.db.session import create_db_engine

    by_sql: dict[str, list[Recorded]] = {}
    for item in recorded:
        by_sql.setdefault(item.sql, []).append(item)
    database = create_db_engine(database_url)
    raw = database.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SELECT relname, reltuples FROM pg_class WHERE relkind = 'r' "
                       "AND relnamespace = 'public'::regnamespace")
        table_rows = {name: float(rows) for name, rows in cursor.fetchall()}
        explained = []
        for sql, items in by_sql.items():
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", items[0].parameters)
            (document,) = cursor.fetchone()
            plan = (json.loads(document) if isinstance(document, str) else document)[0]["Plan"]
            requests = list(dict.fromkeys(i.request for i in items))
            explained.append(summarise(plan, sql, requests, table_rows, big_rows))
        raw.rollback()
    finally:
        raw.close()
        database.dispose()
    return explained


def record_paths(database_url: str, data_dir: Path, *, scan: Path, detector: Path,
                 memory_budget: int, artwork_id: int, image: bytes, caption: str) -> list[Recorded]:
    """Start the service in-process and record every statement of the search and upload
    paths (see the module's docstring); ``artwork_id`` is the one whose detail is read,
    ``image`` (PNG bytes) is annotated as a crop and uploaded with ``caption``."""
    from fastapi.testclient import TestClient
    from sqlalchemy import event

    from app.main import create_app
    from app.settings import Settings

    settings = Settings(database_url=database_url, data_dir=data_dir, scan_checkpoint=scan,
                        detector_checkpoint=detector, api_keys=[KEY], device="cpu",
                        index_sync_seconds=0, retrieval={"memory_budget": memory_budget})
    upload = {"files": {"image": ("upload.png", image, "image/png")}}
    document = {"external_id": "bench-explain-upload", "title": caption, "captions": [caption]}
    replaced = {**document, "captions": [caption, "A second caption about a gold bird."]}
    requests = [
        ("GET /search", lambda c: c.get("/search", params={"q": "a gold bird on a blue vase"})),
        ("POST /annotate", lambda c: c.post("/annotate", **upload)),
        ("GET /artworks/{id}", lambda c: c.get(f"/artworks/{artwork_id}")),
        ("POST /artworks", lambda c: c.post("/artworks", headers={"X-API-Key": KEY},
                                            data={"artwork": json.dumps(document)}, **upload)),
        ("PUT /artworks/external/{id}", lambda c: c.put(
            "/artworks/external/bench-explain-upload", headers={"X-API-Key": KEY},
            data={"artwork": json.dumps(replaced)}, **upload)),
        ("DELETE /artworks/external/{id}", lambda c: c.delete(
            "/artworks/external/bench-explain-upload", headers={"X-API-Key": KEY})),
    ]
    recorded: list[Recorded] = []
    current = [""]

    def on_execute(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
                   executemany: bool) -> None:
        # an executemany's parameter sets come as a list (a batched INSERT's as one dict)
        first = parameters[0] if executemany and isinstance(parameters, list | tuple) else parameters
        recorded.append(Recorded(current[0], statement, first))

    with TestClient(create_app(settings), raise_server_exceptions=True) as client:
        database = client.app.state.runtime.database
        event.listen(database, "before_cursor_execute", on_execute)
        try:
            for name, call in requests:
                current[0] = name
                response = call(client)
                if response.status_code >= 300:
                    raise RuntimeError(f"{name} answered {response.status_code}: {response.text[:300]}")
        finally:
            event.remove(database, "before_cursor_execute", on_execute)
    return recorded


def sample_photo() -> tuple[bytes, str]:
    """One real photograph of demo/real (as PNG) and its catalogue title."""
    from bench.uploads import photos

    return photos(1, seed=0)[0]


def run(postgres: str, fragments: int, *, scan: Path, detector: Path, memory_budget: int,
        scratch: Path, seed: int = 0) -> tuple[dict[str, Any], list[Explained]]:
    """Fill, record and explain; returns what was filled and the explained statements."""
    import shutil

    from app.db.session import create_db_engine
    from bench.fill import fill, scratch_database

    data_dir = scratch.resolve() / f"explain-{fragments}"
    shutil.rmtree(data_dir, ignore_errors=True)
    try:
        with scratch_database(postgres, data_dir) as url:
            database = create_db_engine(url)
            try:
                filled = fill(database, data_dir, fragments=fragments, scan=scan, detector=detector,
                              memory_budget=memory_budget, seed=seed)
            finally:
                database.dispose()
            image, caption = sample_photo()
            recorded = record_paths(url, data_dir, scan=scan, detector=detector,
                                    memory_budget=memory_budget, artwork_id=filled.artworks // 2 + 1,
                                    image=image, caption=caption)
            return asdict(filled), explain_all(url, recorded)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fragments", type=int, default=1_000_000,
                        help="fragments stored before the requests (default %(default)s)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        metavar="URL", help="PostgreSQL server for the scratch database (the URL of "
                        "any database there; default %(default)s)")
    parser.add_argument("--scan", type=Path, default=REPO / "demo" / "scan.pt",
                        help="SCAN checkpoint served (default demo/scan.pt)")
    parser.add_argument("--detector", type=Path, default=REPO / "demo" / "detector.pt",
                        help="detector checkpoint served (default demo/detector.pt)")
    parser.add_argument("--memory-budget", default="4GiB",
                        help="retrieval.memory_budget: picks the index kind (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("--dir", type=Path, default=Path("var/bench-explain"),
                        help="scratch folder for the data (removed after; default %(default)s)")
    add_json_argument(parser)


def format_table(report: dict[str, Any]) -> str:
    header = f"{'request':<31}{'statement':<90}{'plan root':<24}{'reads by':<12}{'rows est':>10}"
    lines = [f"PostgreSQL plans at {report['fragments']:,} fragments ({report['artworks']:,} artworks, "
             f"tables analysed); big table = over {BIG_ROWS:,} rows", header, "-" * len(header)]
    for s in report["statements"]:
        verdict = s["verdict"] + (f" {','.join(s['big_seq_scans'])}" if s["big_seq_scans"] else "")
        lines.append(f"{s['requests'][0]:<31}{s['statement']:<90}{s['root'][:23]:<24}"
                     f"{verdict:<12}{s['rows']:>10,.0f}")
    misses = [s for s in report["statements"] if s["verdict"] == "SEQ SCAN"]
    lines.append(f"{len(report['statements'])} distinct statements; {len(misses)} read a big table "
                 "sequentially; whole-table reads by design: "
                 f"{sum(s['verdict'] == 'whole table' for s in report['statements'])}")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    """Run the benchmark, print the table and the JSON; write the JSON if asked."""
    import torch
    from pydantic import ByteSize, TypeAdapter

    if options.fragments < 1:
        raise ValueError("--fragments must be at least 1")
    torch.set_num_threads(options.threads)
    budget = int(TypeAdapter(ByteSize).validate_python(options.memory_budget))
    filled, explained = run(options.postgres, options.fragments, scan=options.scan,
                            detector=options.detector, memory_budget=budget, scratch=options.dir)
    report = {"benchmark": "explain", "fragments": filled["fragments"], "artworks": filled["artworks"],
              "fill_seconds": filled["seconds"], "big_rows": BIG_ROWS,
              "statements": [{**asdict(e), "verdict": e.verdict} for e in explained]}
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.explain", __doc__, add_arguments, main)
