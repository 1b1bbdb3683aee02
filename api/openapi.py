"""The OpenAPI document: request schemas that routes read by hand, with every reference resolvable."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    """A reference to `model` in the document's components (added by `publish_models`)."""
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def publish_models(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add models that no route declares (bodies parsed by hand) to the components, with their $defs."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(ref_template=REF_TEMPLATE)
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        return document

    app.openapi = openapi  # type: ignore[method-assign]
