"""Property-based check of the API against its own OpenAPI document (schemathesis, Python API).

Every operation is called with generated requests (valid and invalid); no answer may be a
5xx, and every answer must match the document: status codes, content types, bodies.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import TinyCheckpoints
from tests.test_api import (
    WRITE,
    artwork_form,
    make_settings,
    pg_module_url,  # noqa: F401 (a fixture used by this module)
    start,
)

pytestmark = pytest.mark.postgres

EXAMPLES_PER_OPERATION = 6  # keeps the whole run well under a minute on a small CPU
# What "conforms" means here. Left out: schemathesis's positive-data check, because the
# document cannot say everything the service validates (x1 < x2 in a box, the multipart
# 'artwork' part being JSON), so schema-valid nonsense is rightly answered 422.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]


@schemathesis.serializer("application/x-ndjson")
def ndjson(_context: schemathesis.SerializationContext, value: object) -> dict:
    """POST /artworks/batch accepts NDJSON: the generated value is the body's text."""
    return {"data": value if isinstance(value, bytes) else str(value).encode("utf-8")}


@pytest.fixture(scope="module")
def api_schema(pg_module_url: str, tiny_checkpoints: TinyCheckpoints,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    client = start(make_settings(pg_module_url, tmp_path_factory.mktemp("data"),
                                 tiny_checkpoints.scan, tiny_checkpoints.detector))
    # One artwork, so that generated ids sometimes name something that exists.
    assert client.post("/artworks", headers=WRITE, **artwork_form("schema-1")).status_code == 201
    # The lifespan has run inside `client`: the app's state holds the engine for every call.
    yield schemathesis.openapi.from_asgi("/openapi.json", client.app)
    client.__exit__(None, None, None)


def test_api_matches_its_openapi_document(api_schema: schemathesis.BaseSchema) -> None:
    failures = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=WRITE, checks=CHECKS)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 (one report for all)
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
