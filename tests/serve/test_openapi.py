"""The OpenAPI document runs end to end under `schemathesis`: every operation, with generated valid and
invalid requests against the live server (a tiny model), checked for server errors, undocumented status
codes, headers and content types, and responses that do not match their schemas. Not checked: that every
schema-valid request is accepted (`positive_data_acceptance`): the server refuses, by design and with a
400 naming the field, what JSON Schema cannot say (a user message without content, text over the character
bound, an image outside a user message, a model name other than the served one is a 404)."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from mgllava.serve import ServerSettings, create_app
from mgllava.serve.background import serve_in_thread

from ..serving import tiny_engine


@pytest.fixture(scope="module")
def base():
    settings_ = ServerSettings(model_name="tiny", max_tokens=4, default_max_tokens=4, max_images=1)
    with serve_in_thread(create_app(tiny_engine(max_prompt_chars=400), settings_)) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(base):
    return schemathesis.openapi.from_url(f"{base}/openapi.json")


def test_every_ref_resolves_and_errors_and_the_stream_are_documented(base):
    doc = httpx.get(f"{base}/openapi.json").json()
    text = str(doc)
    assert "$defs" not in text
    names = set(doc["components"]["schemas"])
    refs = {part.split("'")[0] for part in text.split("#/components/schemas/")[1:]}
    assert refs <= names, refs - names
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "404", "408", "413", "429", "500", "503", "default"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}


def test_the_api_matches_its_schema(api_schema):
    """schemathesis' pytest plugin does not run under the locked pytest: its Python API, one operation at a time."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/models", "/health"}
    answered = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            if case.path == "/v1/chat/completions" and isinstance(case.body, dict):
                case.body["stream"] = False  # the JSON answer is checked against its schema
            response = case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])
            if case.path == "/v1/chat/completions" and response.status_code == 200:
                answered.append(response.json()["choices"][0]["finish_reason"])

        check()
    assert answered  # generated requests reached the model and its answers matched the schema
