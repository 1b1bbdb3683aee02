"""The OpenAPI document: every reference resolves, the real limits are stated, every error is documented."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from api.app import create_app
from jobs.settings import Settings


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The document the API serves at /openapi.json (building it touches no database)."""
    app = create_app(
        Settings(database_url=f"sqlite:///{tmp_path_factory.mktemp('doc')}/unused.db"), reconcile=False
    )
    return app.openapi()


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    """`#/$defs/PromptItem` used to dangle: the batch body's schema was pasted in with its local $defs."""
    refs = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(document)))
    schemas = document["components"]["schemas"]
    assert refs, "the document has references"
    assert [ref for ref in refs if not ref.startswith("#/components/schemas/")] == []
    assert [ref for ref in refs if ref.rsplit("/", 1)[1] not in schemas] == []


def test_the_real_limits_are_published(document: dict[str, Any]) -> None:
    job = document["components"]["schemas"]["JobCreate"]["properties"]
    assert job["prompt"]["maxLength"] == 2000
    assert job["prompt"]["minLength"] == 1
    assert "pattern" in job["prompt"]  # no control characters
    assert (job["width"]["minimum"], job["width"]["maximum"], job["width"]["multipleOf"]) == (64, 2048, 16)
    assert job["steps"]["maximum"] == 100
    item = document["components"]["schemas"]["PromptItem"]["properties"]
    assert item["prompt"]["maxLength"] == 2000
    estimate = document["components"]["schemas"]["EstimateRequest"]["properties"]
    assert (estimate["sizes"]["maxItems"], estimate["jobs_per_size"]["maximum"]) == (32, 100_000)
    side = document["components"]["schemas"]["SizeToEstimate"]["properties"]["width"]
    assert (side["minimum"], side["maximum"], side["multipleOf"]) == (64, 2048, 16)


@pytest.mark.parametrize(
    ("method", "path", "codes"),
    [
        ("get", "/v1/jobs/{job_id}", {"200", "401", "403", "404", "422", "429", "503"}),
        ("get", "/v1/jobs/{job_id}/image", {"200", "404", "409", "410"}),
        ("post", "/v1/jobs", {"201", "400", "409", "413", "415", "422", "429"}),
        ("post", "/v1/batches", {"201", "400", "409", "413", "415", "422", "429"}),
        ("post", "/v1/batches/{batch_id}/retry", {"201", "404", "409", "413", "415"}),
        ("post", "/v1/queue/pause", {"200", "401", "403", "415"}),
        ("get", "/v1/jobs/{job_id}/thumbnail", {"200", "304", "401", "404", "409", "410", "422"}),
        ("get", "/v1/workers", {"200", "401", "403", "429", "503"}),
        ("post", "/v1/estimate", {"200", "400", "401", "413", "415", "422", "429"}),
    ],
)
def test_error_answers_are_documented(
    document: dict[str, Any], method: str, path: str, codes: set[str]
) -> None:
    documented = set(document["paths"][path][method]["responses"])
    assert codes <= documented, sorted(codes - documented)


def test_every_json_answer_has_a_schema(document: dict[str, Any]) -> None:
    """Response models on every route: no 2xx JSON answer is an untyped object."""
    untyped = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for code, answer in operation["responses"].items():
                schema = answer.get("content", {}).get("application/json", {}).get("schema")
                if code.startswith("2") and schema is not None and schema in ({}, {"type": "object"}):
                    untyped.append(f"{method.upper()} {path} {code}")
    assert untyped == []


def test_routing_fields_are_stated(document: dict[str, Any]) -> None:
    """Clients learn from the schema that a job may wait for a worker of its model, and why."""
    schemas = document["components"]["schemas"]
    assert schemas["JobView"]["properties"]["unserved"]["type"] == "boolean"
    assert "unserved" in schemas["JobView"]["required"]
    assert schemas["BatchView"]["properties"]["unserved_models"]["items"]["type"] == "string"
    assert "unserved_models" in schemas["BatchView"]["required"]
    for created in ("JobCreated", "BatchCreated"):
        assert schemas[created]["properties"]["warnings"]["items"]["type"] == "string", created
        assert "warnings" in schemas[created]["required"], created
    assert schemas["WorkerView"]["properties"]["queue"]["type"] == "string"
