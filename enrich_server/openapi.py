"""``/openapi.json``: OpenAPI 3.1 description of the DMP API (user sync and ingestion).

The micro-batch item schema comes from the ``Mutation`` type itself (msgspec), so the
document cannot drift from what the server decodes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from enrich_server import __version__
from enrich_server.config import Config
from enrich_server.ingest.batches import MAX_TTL, Mutation
from enrich_server.ingest.sync import MAX_THEIR_ID_BYTES

_JSON = "application/json"


def _query(name: str, description: str, required: bool = True, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _answer(description: str, ref: str = "Ok") -> dict[str, Any]:
    return {
        "description": description,
        "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


#: Ingestion calls: HTTP Basic or a bearer token naming the platform.
_PLATFORM_AUTH: list[dict[str, list[str]]] = [{"basic": []}, {"bearer": []}]
_NOT_OURS = _answer("No such segment of this platform", "Error")
_ERRORS: dict[str, Any] = {
    "400": _answer("Malformed request; a refused batch lists its bad items", "Error"),
    "401": _answer("Missing or wrong ingestion credentials", "Error"),
    "413": _answer("Body too large", "Error"),
    "503": _answer("Store not writable right now; nothing applied", "Error"),
}


def openapi_document(config: Config) -> dict[str, Any]:
    """The OpenAPI document for this configuration (its limits are the configured ones)."""
    (mutation,), components = msgspec.json.schema_components([Mutation])
    del mutation  # referenced by name below
    mutation_schema = components["Mutation"]
    mutation_schema["properties"]["ttl"]["anyOf"][0].update(minimum=0, maximum=MAX_TTL)
    mutation_schema["properties"]["segment"].update(minimum=1)
    max_batch = config.dmp.max_batch
    sync_user = [_query("userid", "the platform's user id", maxLength=MAX_THEIR_ID_BYTES)]
    signed = [
        _query("pl", "platform id", required=False, type="integer"),
        _query("ts", "signed form: unix seconds", required=False, type="integer"),
        _query(
            "sig",
            "signed form: HMAC-SHA1 (hex) with the platform's secret over every other "
            "parameter, sorted by name, RFC 3986-encoded, name=value joined by &",
            required=False,
        ),
    ]
    population = [
        _query("id", "segment id", type="integer", minimum=1),
        _query("userid", "the user (our user id unless idtype says otherwise)"),
        _query("idtype", "uid (default), ifa or eid:<source>", required=False),
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "enrich-server DMP API",
            "version": __version__,
            "description": "User sync and audience ingestion for DMPs (Mapp's execution "
            "platform integration). Ingestion calls authenticate a platform by HTTP Basic "
            "or a bearer token.",
        },
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Mutation": mutation_schema,
                "Batch": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/Mutation"},
                    "minItems": 1,
                    "maxItems": max_batch,
                },
                "Ok": {
                    "type": "object",
                    "properties": {"status": {"const": "OK"}},
                    "required": ["status"],
                },
                "Applied": {
                    "type": "object",
                    "properties": {"status": {"const": "OK"}, "applied": {"type": "integer"}},
                    "required": ["status", "applied"],
                },
                "Created": {
                    "type": "object",
                    "properties": {
                        "status": {"const": "OK"},
                        "created": {"type": "boolean"},
                        "segment_id": {"type": "integer"},
                    },
                    "required": ["status", "created", "segment_id"],
                },
                "Segment": {
                    "type": "object",
                    "properties": {
                        "segment_id": {"type": "integer"},
                        "title": {"type": "string"},
                        "key": {"type": "string", "description": "the name served to Index"},
                        "created": {"type": "integer", "description": "unix seconds"},
                    },
                    "required": ["segment_id", "title", "key", "created"],
                },
                "Error": {
                    "type": "object",
                    "properties": {
                        "status": {"const": "error"},
                        "error": {"type": "string"},
                        "problems": {"type": "array", "items": {"type": "string"}},
                        "more": {"type": "integer"},
                    },
                    "required": ["status", "error"],
                },
            },
        },
        "paths": {
            "/sync": {
                "get": {
                    "summary": "Redirect to out with [[USERID]] replaced by our user id",
                    "parameters": [
                        _query(
                            "out",
                            "http(s) URL on an allowed host; unsigned: the first parameter, "
                            "everything after out= is the target",
                        ),
                        *signed,
                    ],
                    "responses": {
                        "302": {"description": "Redirect; sets our user id cookie"},
                        "400": _answer("out missing or not an allowed target", "Error"),
                        "403": _answer("Bad signature, stale ts or unknown platform", "Error"),
                    },
                }
            },
            "/uid": {
                "get": {
                    "summary": "Store a platform's user id as an alias of our user id",
                    "parameters": [
                        *sync_user,
                        _query("plsec", "the platform's secure token", required=False),
                        *signed,
                    ],
                    "responses": {
                        "200": _answer("Mapped; sets our user id cookie"),
                        "400": _answer("Bad userid", "Error"),
                        "403": _answer("Bad plsec or signature, unknown platform", "Error"),
                    },
                }
            },
            "/v1/segment": {
                "get": {
                    "summary": "List this platform's segments",
                    "security": _PLATFORM_AUTH,
                    "responses": {
                        "200": {
                            "description": "Segments",
                            "content": {
                                _JSON: {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "segments": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Segment"},
                                            }
                                        },
                                    }
                                }
                            },
                        },
                        "401": _ERRORS["401"],
                    },
                },
                "post": {
                    "summary": "Create a segment (?title=[&key=]), add one user (?id=&userid=), "
                    "or apply a micro-batch (JSON array body): validated whole, one commit",
                    "security": _PLATFORM_AUTH,
                    "parameters": [
                        _query("title", "create: segment title", required=False),
                        _query("key", "create: name served to Index", required=False),
                        _query("id", "add one: segment id", required=False, type="integer"),
                        _query("userid", "add one: user", required=False),
                        _query(
                            "ttl",
                            "add one: seconds, 0 = never",
                            required=False,
                            type="integer",
                            minimum=0,
                            maximum=MAX_TTL,
                        ),
                        _query("idtype", "add one: uid, ifa or eid:<source>", required=False),
                    ],
                    "requestBody": {
                        "required": False,
                        "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Batch"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "Created/found (title), or mutations applied",
                            "content": {
                                _JSON: {
                                    "schema": {
                                        "oneOf": [
                                            {"$ref": "#/components/schemas/Created"},
                                            {"$ref": "#/components/schemas/Applied"},
                                        ]
                                    }
                                }
                            },
                        },
                        "409": _answer("The key names another DMP segment", "Error"),
                        **_ERRORS,
                    },
                },
                "delete": {
                    "summary": "Remove one user from a segment",
                    "security": _PLATFORM_AUTH,
                    "parameters": population,
                    "responses": {"200": _answer("Removed", "Applied"), **_ERRORS},
                },
            },
            "/v1/segment/{segment_id}": {
                "parameters": [
                    {
                        "name": "segment_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    }
                ],
                "get": {
                    "summary": "One segment of this platform",
                    "security": _PLATFORM_AUTH,
                    "responses": {
                        "200": {"description": "The segment"},
                        "401": _ERRORS["401"],
                        "404": _NOT_OURS,
                    },
                },
                "delete": {
                    "summary": "Delete a segment and all its memberships",
                    "security": _PLATFORM_AUTH,
                    "responses": {
                        "200": {"description": "Deleted"},
                        "401": _ERRORS["401"],
                        "404": _NOT_OURS,
                    },
                },
            },
        },
    }
