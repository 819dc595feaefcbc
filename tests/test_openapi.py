"""The OpenAPI document: valid OpenAPI 3.1, and saying what clients need to know.

What the service answers is checked against the document by ``tests/test_openapi_fuzz.py``;
this module checks the document itself: security and scopes, problem schemas and their codes,
headers, links, named schemas, examples and the rules stated in parameters and bodies.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import httpx
import jsonschema_rs
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from pydantic import BaseModel

from app.connectors import schemas
from app.connectors.kinds import KINDS, create_examples
from app.core.config import Settings
from app.core.errors import ERROR_CLASSES
from app.main import create_app
from app.webhooks.schemas import WebhookCreate, WebhookPatch

DOCUMENT: dict[str, Any] = create_app(
    Settings(jwt_secret="x" * 32, encryption_keys="k1:" + "A" * 43)
).openapi()
COMPONENTS: dict[str, Any] = DOCUMENT["components"]["schemas"]
METHODS = ("get", "put", "post", "patch", "delete")

# operationId: (method, path, scope, problem codes)
OPERATIONS: dict[str, tuple[str, str, str | None, set[str]]] = {
    "createConnector": (
        "post",
        "/connectors",
        "connectors:write",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "name_taken",
            "connector_limit_reached",
            "payload_too_large",
            "invalid_request",
            "key_checks_busy",
            "credentials_rejected",
            "destination_not_allowed",
            "token_endpoint_error",
            "upstream_unreachable",
            "name_not_resolved",
            "token_endpoint_timeout",
            "upstream_timeout",
        },
    ),
    "listConnectors": (
        "get",
        "/connectors",
        "connectors:read",
        {"unauthenticated", "forbidden", "database_unavailable"},
    ),
    "getConnector": (
        "get",
        "/connectors/{connector_id}",
        "connectors:read",
        {"unauthenticated", "forbidden", "database_unavailable", "connector_not_found"},
    ),
    "updateConnector": (
        "patch",
        "/connectors/{connector_id}",
        "connectors:write",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "connector_not_found",
            "name_taken",
            "version_mismatch",
            "payload_too_large",
            "invalid_request",
            "secret_required",
            "secret_unreadable",
            "key_checks_busy",
            "credentials_rejected",
            "destination_not_allowed",
            "token_endpoint_error",
            "upstream_unreachable",
            "name_not_resolved",
            "token_endpoint_timeout",
            "upstream_timeout",
        },
    ),
    "deleteConnector": (
        "delete",
        "/connectors/{connector_id}",
        "connectors:write",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "connector_not_found",
            "version_mismatch",
            "invalid_request",
        },
    ),
    "validateConnector": (
        "post",
        "/connectors/{connector_id}/validate",
        "connectors:write",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "connector_not_found",
            "version_mismatch",
            "secret_unreadable",
        },
    ),
    "startConsent": (
        "post",
        "/connectors/{connector_id}/consent",
        "connectors:write",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "connector_not_found",
            "wrong_grant_type",
            "payload_too_large",
            "invalid_request",
        },
    ),
    # A browser's page, not an API call: its refusals are pages too (see its own test).
    "consentCallback": ("get", "/oauth/callback", None, set()),
    "getConnectorHistory": (
        "get",
        "/connectors/{connector_id}/history",
        "connectors:read",
        {"unauthenticated", "forbidden", "database_unavailable", "connector_not_found", "invalid_request"},
    ),
    "authorizeConnector": (
        "post",
        "/connectors/{connector_id}/authorize",
        "connectors:authorize",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "connector_not_found",
            "payload_too_large",
            "invalid_request",
            "path_outside_resource_domain",
            "secret_unreadable",
            "consent_required",
            "credentials_rejected",
            "destination_not_allowed",
            "token_endpoint_error",
            "upstream_unreachable",
            "name_not_resolved",
            "token_endpoint_timeout",
        },
    ),
    "createWebhook": (
        "post",
        "/webhooks",
        "connectors:write",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "webhook_limit_reached",
            "payload_too_large",
            "invalid_request",
            "destination_not_allowed",
        },
    ),
    "listWebhooks": (
        "get",
        "/webhooks",
        "connectors:read",
        {"unauthenticated", "forbidden", "database_unavailable"},
    ),
    "getWebhook": (
        "get",
        "/webhooks/{webhook_id}",
        "connectors:read",
        {"unauthenticated", "forbidden", "database_unavailable", "webhook_not_found"},
    ),
    "updateWebhook": (
        "patch",
        "/webhooks/{webhook_id}",
        "connectors:write",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "webhook_not_found",
            "version_mismatch",
            "payload_too_large",
            "invalid_request",
            "destination_not_allowed",
        },
    ),
    "deleteWebhook": (
        "delete",
        "/webhooks/{webhook_id}",
        "connectors:write",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "webhook_not_found",
            "version_mismatch",
            "invalid_request",
        },
    ),
    "rotateWebhookSecret": (
        "post",
        "/webhooks/{webhook_id}/rotate-secret",
        "connectors:write",
        {"unauthenticated", "forbidden", "database_unavailable", "webhook_not_found"},
    ),
    "listWebhookDeliveries": (
        "get",
        "/webhooks/{webhook_id}/deliveries",
        "connectors:read",
        {"unauthenticated", "forbidden", "database_unavailable", "webhook_not_found", "invalid_request"},
    ),
    "resendWebhookDelivery": (
        "post",
        "/webhooks/{webhook_id}/deliveries/{delivery_id}/resend",
        "connectors:write",
        {
            "unauthenticated",
            "forbidden",
            "database_unavailable",
            "webhook_not_found",
            "webhook_delivery_not_found",
            "webhook_not_deliverable",
            "resend_limit_reached",
        },
    ),
    "getLiveness": ("get", "/healthz", None, set()),
    "getReadiness": ("get", "/readyz", None, {"database_unavailable", "starting"}),
    "getMetrics": ("get", "/metrics", None, set()),
}


# On save these are the caller's input (422); at authorize they are the upstream's failure.
UPSTREAM_AT_AUTHORIZE = {("credentials_rejected", "502"), ("destination_not_allowed", "502")}


def operation(operation_id: str) -> dict[str, Any]:
    method, path, _, _ = OPERATIONS[operation_id]
    found: dict[str, Any] = DOCUMENT["paths"][path][method]
    return found


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = COMPONENTS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def as_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema with the components it refers to, for a JSON Schema validator."""
    return {**copy.deepcopy(schema), "components": {"schemas": COMPONENTS}}


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    validate(DOCUMENT, cls=OpenAPIV31SpecValidator)


async def test_the_served_document_is_the_one_described() -> None:
    app = create_app(Settings(jwt_secret="x" * 32, encryption_keys="k1:" + "A" * 43))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        served = (await client.get("/openapi.json")).json()
    validate(served, cls=OpenAPIV31SpecValidator)
    assert served["paths"] == DOCUMENT["paths"]
    assert served["components"] == DOCUMENT["components"]


def test_operation_ids_are_the_documented_names() -> None:
    found = {
        operation["operationId"]: (method, path)
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }
    assert found == {name: (method, path) for name, (method, path, _, _) in OPERATIONS.items()}


def test_callers_authenticate_with_a_bearer_jwt() -> None:
    assert DOCUMENT["components"]["securitySchemes"] == {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": DOCUMENT["components"]["securitySchemes"]["bearerAuth"]["description"],
        }
    }
    assert "security" not in DOCUMENT  # no default: each operation says what it needs


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_each_operation_states_the_scope_it_needs(operation_id: str) -> None:
    _, _, scope, _ = OPERATIONS[operation_id]
    found = operation(operation_id)
    if scope is None:
        assert "security" not in found
        assert "401" not in found["responses"]
        return
    assert found["security"] == [{"bearerAuth": [scope]}]
    assert f"`{scope}` scope" in found["description"]


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_every_error_is_a_problem_listing_the_operations_codes(operation_id: str) -> None:
    _, _, _, codes = OPERATIONS[operation_id]
    found = operation(operation_id)
    errors = {status: response for status, response in found["responses"].items() if int(status) >= 400}
    assert {code for code in codes if code in ERROR_CLASSES} == codes
    if operation_id == "consentCallback":
        assert set(errors) == {"400"} and list(errors["400"]["content"]) == ["text/html"]
        return
    if not codes:
        assert errors == {}
        return
    name = operation_id[0].upper() + operation_id[1:] + "Problem"
    problem = COMPONENTS[name]
    assert problem["allOf"][0] == {"$ref": "#/components/schemas/Problem"}
    narrowed = problem["allOf"][1]["properties"]
    assert set(narrowed["code"]["enum"]) == codes
    assert set(narrowed["status"]["enum"]) == {int(status) for status in errors}
    for status, response in errors.items():
        assert list(response["content"]) == ["application/problem+json"]
        assert response["content"]["application/problem+json"]["schema"] == {
            "$ref": f"#/components/schemas/{name}"
        }
        said = set(re.findall(r"`([a-z_]+)`:", response["description"]))
        assert said and said <= codes
        for code in said:
            assert ERROR_CLASSES[code].status == int(status) or (code, status) in UPSTREAM_AT_AUTHORIZE


def test_a_problem_has_the_rfc_9457_members_and_the_services_own() -> None:
    problem = COMPONENTS["Problem"]
    assert problem["required"] == ["type", "title", "status", "detail", "code"]
    assert {"errors", "request_id", "provider_error"} <= set(problem["properties"])
    assert problem["properties"]["errors"]["items"] == {"$ref": "#/components/schemas/FieldError"}
    assert COMPONENTS["FieldError"]["required"] == ["field", "reason"]
    body = {
        "type": "urn:connectors:problem:name_taken",
        "title": "Another connector of the organization has that name",
        "status": 409,
        "detail": "Another connector of the organization has that name",
        "code": "name_taken",
        "request_id": "5f0e",
    }
    problem_schema = as_json_schema({"$ref": "#/components/schemas/CreateConnectorProblem"})
    jsonschema_rs.validate(problem_schema, body)
    with pytest.raises(jsonschema_rs.ValidationError):
        jsonschema_rs.validate(problem_schema, {**body, "code": "path_outside_resource_domain"})


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_every_schema_compiles_for_a_json_schema_validator(name: str) -> None:
    # jsonschema-rs compiles every pattern with Rust's regex engine, as schema validators do.
    jsonschema_rs.validator_for(as_json_schema({"$ref": f"#/components/schemas/{name}"}))


def test_framework_validation_errors_are_not_documented() -> None:
    assert "HTTPValidationError" not in COMPONENTS
    assert "ValidationError" not in COMPONENTS


@pytest.mark.parametrize(
    ("operation_id", "status"),
    [
        ("createConnector", "201"),
        ("getConnector", "200"),
        ("updateConnector", "200"),
        ("validateConnector", "200"),
        ("createWebhook", "201"),
        ("getWebhook", "200"),
        ("updateWebhook", "200"),
        ("rotateWebhookSecret", "200"),
    ],
)
def test_the_etag_is_documented(operation_id: str, status: str) -> None:
    header = operation(operation_id)["responses"][status]["headers"]["ETag"]
    assert header["required"] is True
    assert re.fullmatch(header["schema"]["pattern"], '"3"')


def test_the_other_response_headers_are_documented() -> None:
    created = operation("createConnector")["responses"]["201"]["headers"]
    assert created["Location"]["required"] is True
    authorized = operation("authorizeConnector")["responses"]["200"]["headers"]
    assert authorized["Cache-Control"] == {**authorized["Cache-Control"], "required": True}
    assert authorized["Cache-Control"]["schema"]["enum"] == ["no-store"]
    for operation_id, status in (("createWebhook", "201"), ("rotateWebhookSecret", "200")):
        # The answers holding a webhook's signing secret.
        no_store = operation(operation_id)["responses"][status]["headers"]["Cache-Control"]
        assert no_store["required"] is True and no_store["schema"]["enum"] == ["no-store"]
    assert operation("createWebhook")["responses"]["201"]["headers"]["Location"]["required"] is True
    throttled = operation("validateConnector")["responses"]["200"]["headers"]["Retry-After"]
    assert throttled["required"] is False and throttled["schema"]["minimum"] == 1
    for operation_id, (_, _, scope, codes) in OPERATIONS.items():
        responses = operation(operation_id)["responses"]
        if "database_unavailable" in codes:
            assert responses["503"]["headers"]["Retry-After"]["required"] is True
        if scope is not None:
            assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True


def test_a_created_connector_links_to_every_operation_on_it() -> None:
    links = operation("createConnector")["responses"]["201"]["links"]
    on_one = {name for name, (_, path, _, _) in OPERATIONS.items() if "{connector_id}" in path}
    assert set(links) == on_one
    for name, link in links.items():
        assert link["operationId"] == name
        assert link["parameters"] == {"connector_id": "$response.body#/id"}


def test_a_created_webhook_links_to_every_operation_on_it_and_deliveries_to_a_resend() -> None:
    links = operation("createWebhook")["responses"]["201"]["links"]
    on_one = {
        name
        for name, (_, path, _, _) in OPERATIONS.items()
        if "{webhook_id}" in path and "{delivery_id}" not in path
    }
    assert set(links) == on_one
    for name, link in links.items():
        assert link["operationId"] == name
        assert link["parameters"] == {"webhook_id": "$response.body#/id"}
    resend = operation("listWebhookDeliveries")["responses"]["200"]["links"]["resendWebhookDelivery"]
    assert resend["parameters"] == {
        "webhook_id": "$request.path.webhook_id",
        "delivery_id": "$response.body#/items/0/id",
    }


def test_bodies_and_answers_are_named_schemas() -> None:
    def body(operation_id: str) -> dict[str, Any]:
        schema: dict[str, Any] = operation(operation_id)["requestBody"]["content"]["application/json"][
            "schema"
        ]
        return schema

    def answer(operation_id: str, status: str = "200") -> dict[str, Any]:
        schema: dict[str, Any] = operation(operation_id)["responses"][status]["content"]["application/json"][
            "schema"
        ]
        return schema

    ref = "#/components/schemas/"
    assert body("createConnector") == {"$ref": ref + "ConnectorCreate"}
    assert body("updateConnector") == {"$ref": ref + "ConnectorPatch"}
    assert body("authorizeConnector") == {"$ref": ref + "AuthorizeRequest"}
    assert operation("authorizeConnector")["requestBody"]["required"] is False
    assert answer("createConnector", "201") == {"$ref": ref + "Connector"}
    for operation_id in ("getConnector", "updateConnector", "validateConnector"):
        assert answer(operation_id) == {"$ref": ref + "Connector"}
    assert answer("listConnectors") == {"$ref": ref + "ConnectorList"}
    assert answer("getConnectorHistory") == {"$ref": ref + "AuditEventList"}
    assert answer("authorizeConnector") == {"$ref": ref + "AuthorizeResponse"}
    assert body("createWebhook") == {"$ref": ref + "WebhookCreate"}
    assert body("updateWebhook") == {"$ref": ref + "WebhookPatch"}
    assert (
        answer("createWebhook", "201") == answer("rotateWebhookSecret") == {"$ref": ref + "WebhookWithSecret"}
    )
    assert answer("getWebhook") == answer("updateWebhook") == {"$ref": ref + "Webhook"}
    assert answer("listWebhooks") == {"$ref": ref + "WebhookList"}
    assert answer("listWebhookDeliveries") == {"$ref": ref + "WebhookDeliveryList"}
    assert answer("resendWebhookDelivery", "202") == {"$ref": ref + "WebhookDelivery"}
    assert not [name for name in COMPONENTS if name.endswith(("-Input", "-Output"))]
    for name, schema in COMPONENTS.items():
        assert schema.get("title", name) == name


EXAMPLES: dict[tuple[str, type[BaseModel]], set[str]] = {
    # One per registered kind, and per client-authentication method with fields of its own.
    ("createConnector", schemas.ConnectorCreate): {example.name for example in create_examples()},
    ("updateConnector", schemas.ConnectorPatch): {"rename", "secretRotation", "moveTokenURL", "switchType"},
    ("createWebhook", WebhookCreate): {"allEvents", "someEvents", "disabled"},
    ("updateWebhook", WebhookPatch): {"moveURL", "reEnable", "pause", "everyEvent"},
}


@pytest.mark.parametrize(("operation_id", "model"), list(EXAMPLES), ids=[key[0] for key in EXAMPLES])
def test_named_examples_for_every_auth_shape_are_valid(operation_id: str, model: type[Any]) -> None:
    media = operation(operation_id)["requestBody"]["content"]["application/json"]
    assert set(media["examples"]) == EXAMPLES[operation_id, model]
    schema = as_json_schema(media["schema"])
    for example in media["examples"].values():
        jsonschema_rs.validate(schema, example["value"])
        model.model_validate(example["value"])
    if model is schemas.ConnectorCreate:
        shapes = {
            (
                e["value"]["auth"]["type"],
                e["value"]["auth"].get("grant_type"),
                e["value"]["auth"].get("client_auth_method"),
            )
            for e in media["examples"].values()
        }
        assert {shape[:2] for shape in shapes} == {(kind.auth_type, kind.variant) for kind in KINDS}
        assert {shape[2] for shape in shapes} - {None} >= {"private_key_jwt", "tls_client_auth"}


def parameter(operation_id: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [p for p in operation(operation_id)["parameters"] if p["name"] == name]
    assert len(found) == 1
    return found[0]


def test_parameters_state_their_rules() -> None:
    for operation_id, (_, path, _, _) in OPERATIONS.items():
        if "{connector_id}" in path:
            schema = parameter(operation_id, "connector_id")["schema"]
            assert re.search(schema["pattern"], "5b0c8f0e-2f7a-4c2e-9d1b-6a1f3c9e8d21")
            assert not re.search(schema["pattern"], "5B0C8F0E-2F7A-4C2E-9D1B-6A1F3C9E8D21")
        for name in ("webhook_id", "delivery_id"):
            if f"{{{name}}}" in path:
                schema = parameter(operation_id, name)["schema"]
                assert re.search(schema["pattern"], "5b0c8f0e-2f7a-4c2e-9d1b-6a1f3c9e8d21")
                assert not re.search(schema["pattern"], "5b0c8f0e2f7a4c2e9d1b6a1f3c9e8d21")
    for operation_id in ("updateConnector", "deleteConnector", "updateWebhook", "deleteWebhook"):
        if_match = parameter(operation_id, "If-Match")
        assert if_match["in"] == "header" and if_match["required"] is False
        assert if_match["schema"]["type"] == "string"
        for value in ('"3"', '"3", W/"4"', "*"):
            assert re.search(if_match["schema"]["pattern"], value)
        for value in ("3", "null", '"3", *'):
            assert not re.search(if_match["schema"]["pattern"], value)
    for operation_id in ("createConnector", "updateConnector"):
        assert parameter(operation_id, "validate")["schema"]["type"] == "boolean"
    for operation_id in ("getConnectorHistory", "listWebhookDeliveries"):
        limit = parameter(operation_id, "limit")["schema"]
        assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 1000, 100)


def test_bodies_state_their_rules() -> None:
    create = COMPONENTS["ConnectorCreate"]["properties"]
    assert "pattern" in create["name"]
    url = create["resource_domain_url"]
    assert (url["maxLength"], url["format"]) == (2048, "uri") and url["pattern"].startswith("^https://")
    basic = COMPONENTS["BasicAuthIn"]["properties"]
    assert not re.search(basic["username"]["pattern"], "user:name")
    assert basic["password"]["writeOnly"] is True
    params = COMPONENTS["OAuth2ClientCredentialsIn"]["properties"]["extra_token_params"]
    assert params == {"$ref": "#/components/schemas/ExtraTokenParams"}
    assert resolve(params)["maxProperties"] == 10 and "propertyNames" in resolve(params)
    method = COMPONENTS["OAuth2PasswordIn"]["properties"]["client_auth_method"]
    assert resolve(method)["enum"] == ["client_secret_basic", "client_secret_post"]
    authorize = COMPONENTS["AuthorizeRequest"]["properties"]
    assert authorize["force_refresh"]["type"] == "boolean"
    assert "path_outside_resource_domain" in authorize["path"]["anyOf"][0]["description"]
    patch = COMPONENTS["ConnectorPatch"]["properties"]
    assert patch["name"]["type"] == "string" and "default" not in patch["name"]  # not null
    assert {"type": "null"} in patch["auth"]["anyOf"]


def test_webhook_bodies_state_their_rules_and_reads_hold_no_secret() -> None:
    create = COMPONENTS["WebhookCreate"]["properties"]
    assert create["url"]["pattern"].startswith("^https://") and create["url"]["maxLength"] == 2048
    types = create["event_types"]
    assert types["uniqueItems"] is True and len(types["items"]["enum"]) == types["maxItems"] == 4
    assert create["enabled"] == {**create["enabled"], "type": "boolean", "default": True}
    assert COMPONENTS["WebhookCreate"]["required"] == ["url"]
    patch = COMPONENTS["WebhookPatch"]["properties"]
    assert all("default" not in field and "anyOf" not in field for field in patch.values())  # not null
    assert "secret" in COMPONENTS["WebhookWithSecret"]["required"]
    for name in ("Webhook", "WebhookList", "WebhookDelivery", "WebhookDeliveryList"):
        assert '"secret"' not in str(COMPONENTS[name]).replace("'", '"')


def test_every_registered_kind_has_an_example_and_a_model_in_the_python_client() -> None:
    """A kind added to the service without a model in the client (or without an example) fails
    here: the client parses each example into its own ``ConnectorCreate``."""
    import connectors_client

    names = [example.name for example in create_examples()]
    assert len(names) == len(set(names))
    covered = {(kind.auth_type, kind.variant) for kind in KINDS}
    for kind in KINDS:
        assert kind.example.value["auth"]["type"] == kind.auth_type
    for example in create_examples():
        parsed = connectors_client.ConnectorCreate.model_validate(example.value)
        sent = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
        auth = sent["auth"]
        assert (auth["type"], auth.get("grant_type")) in covered
        assert set(auth) == set(example.value["auth"]), example.name
