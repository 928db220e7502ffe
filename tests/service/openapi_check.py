"""Keeps GET /openapi.json true to the server that serves it.

Run by tests/service/openapi.rs against a real server: python check.py BASE_URL FIXTURES_DIR WORK_DIR

1. The document is a valid OpenAPI 3.1 description (openapi-spec-validator).
2. Real requests, a success and a refusal on every route, are answered as the document says:
   schemathesis validates each response's status, content type, headers and JSON body.
3. The checks bite: a document that demands a header the server never sends fails them.
4. schemathesis generates requests from the document, valid and hostile, and checks every
   answer (no 5xx, only documented statuses, content types, headers and bodies, invalid input
   refused, unknown methods refused with a correct `Allow`).
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import requests
import schemathesis
from openapi_spec_validator import validate
from schemathesis.core.failures import FailureGroup

base, fixtures, work = sys.argv[1].rstrip("/"), Path(sys.argv[2]), Path(sys.argv[3])
document = requests.get(f"{base}/openapi.json", timeout=30).json()

# 1. A valid OpenAPI 3.1 document.
validate(document)
assert document["openapi"] == "3.1.0", document["openapi"]
schema = schemathesis.openapi.from_dict(document)

photo = (fixtures / "images" / "chelsea_small.png").read_bytes()
checked = []


def check(path, method, response, **case):
    """Validates one real response against the operation the document gives it."""
    operation = schema[path][method]
    operation.Case(**case).validate_response(response)
    checked.append(f"{method} {path} {response.status_code}")
    return response


def predict(query=None, files=None, data=None):
    files = files if files is not None else {"image": ("src/street.png", photo, "image/png")}
    response = requests.post(f"{base}/predict", params=query, files=files, data=data, timeout=120)
    return check("/predict", "POST", response, query=query, media_type="multipart/form-data")


# 2. Real answers, every format and a refusal of each kind a client can cause.
ids = {}
for fmt, content_type in [("png", "image/png"), ("png16", "image/png"), ("npy", "application/x-npy"), ("ply", "application/x-ply")]:
    response = predict({"format": fmt})
    assert response.status_code == 201, (fmt, response.status_code, response.text[:300])
    assert response.headers["content-type"] == content_type, response.headers
    ids[fmt] = response.headers["location"].rsplit("/", 1)[1]
response = predict({"format": "ply", "fov": "70", "points": "5000", "edges": "0"})
assert response.status_code == 201, response.text[:300]
response = predict(data={"colormap": "viridis"})
assert response.status_code == 201, response.text[:300]

refusals = [
    ({"format": "tiff"}, None, None, 400, "bad_query"),
    ({"fov": "180"}, None, None, 400, "bad_query"),
    ({"format": "ply", "colormap": "gray"}, None, None, 400, "bad_query"),
    ({"points": "0"}, None, None, 400, "bad_query"),
    (None, {"note": (None, "hello")}, None, 400, "unexpected_field"),
    (None, {"image": ("empty.png", b"", "image/png")}, None, 400, "empty_file"),
    (None, {"image": ("notes.txt", b"hello", "text/plain")}, None, 415, "unsupported_extension"),
    (None, {"image": ("street.jpg", photo, "image/jpeg")}, None, 415, "type_mismatch"),
    (None, {"image": ("street.png", photo[: len(photo) // 2], "image/png")}, None, 422, "truncated_image"),
]
for query, files, data, status, code in refusals:
    response = predict(query, files, data)
    assert response.status_code == status, (query, files and list(files), response.status_code, response.text)
    assert response.json()["error"] == code, response.text
response = requests.post(f"{base}/predict", data=b"{}", headers={"content-type": "application/json"}, timeout=30)
check("/predict", "POST", response, media_type="application/json")
assert response.status_code == 415 and response.json()["error"] == "not_multipart", response.text

for fmt, request_id in ids.items():
    response = check("/predictions/{id}", "GET", requests.get(f"{base}/predictions/{request_id}", timeout=30), path_parameters={"id": request_id})
    assert response.status_code == 200 and response.headers["etag"] == f'"{request_id}"', response.headers
    again = requests.get(f"{base}/predictions/{request_id}", headers={"if-none-match": response.headers["etag"]}, timeout=30)
    check("/predictions/{id}", "GET", again, path_parameters={"id": request_id}, headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304, again.status_code
    head = requests.head(f"{base}/predictions/{request_id}", timeout=30)
    check("/predictions/{id}", "HEAD", head, path_parameters={"id": request_id})
    assert head.status_code == 200, head.status_code
missing = requests.get(f"{base}/predictions/20200101-00000000000000000000000000000000", timeout=30)
check("/predictions/{id}", "GET", missing, path_parameters={"id": "20200101-00000000000000000000000000000000"})
assert missing.status_code == 404 and missing.json()["error"] == "not_found", missing.text

for path, methods in [("/", ["GET", "HEAD"]), ("/openapi.json", ["GET", "HEAD"]), ("/healthz", ["GET", "HEAD"]), ("/readyz", ["GET", "HEAD"]), ("/metrics", ["GET"])]:
    for method in methods:
        response = check(path, method, requests.request(method, f"{base}{path}", timeout=30))
        assert response.status_code == 200, (method, path, response.status_code)
not_allowed = requests.delete(f"{base}/metrics", timeout=30)
assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "GET", not_allowed.headers
assert not_allowed.json()["error"] in document["components"]["schemas"]["ErrorCode"]["enum"]

# 3. The checks bite: a document demanding a header nobody sends rejects a real answer.
wrong = copy.deepcopy(document)
wrong["paths"]["/healthz"]["get"]["responses"]["200"] = {
    "description": "demands a header the server never sends",
    "headers": {"x-never-sent": {"required": True, "schema": {"type": "string"}}},
    "content": {"application/json": {"schema": {"type": "object"}}},
}
try:
    schemathesis.openapi.from_dict(wrong)["/healthz"]["GET"].Case().validate_response(requests.get(f"{base}/healthz", timeout=30))
except FailureGroup:
    pass
else:
    sys.exit("a response missing a required header passed validation: the checks do not bite")

# 4. Generated requests, valid and hostile, over every operation. A stored prediction's id
# lets the fuzzer reach the 200 answers of /predictions/{id}; random bytes are never an image,
# so a schema-valid /predict upload cannot be expected to succeed (the real ones above do).
config = work / "schemathesis.toml"
config.write_text(
    f"""
[checks]
enabled = true

[[operations]]
include-path = "/predict"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-path-regex = "^/predictions/"
parameters = {{ id = "{ids['png']}" }}
"""
)
fuzz = subprocess.run(
    [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
        "run", f"{base}/openapi.json",
        "--workers", "1", "--max-examples", "25", "--seed", "20261205",
        "--phases", "examples,coverage,fuzzing", "--request-timeout", "60",
        "--report", "junit", "--report-dir", str(work / "report"),
    ],
    cwd=work,
)
if fuzz.returncode != 0:
    sys.exit(f"schemathesis found answers the document does not describe (exit {fuzz.returncode})")
print(json.dumps({"checked": checked}))
