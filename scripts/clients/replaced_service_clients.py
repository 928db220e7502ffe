"""The replaced service's own clients, replayed against a running midas-serve.

Its test suite posted an image with `requests` under the form field `image` and asserted the
status and content type; its Streamlit front end posted the uploaded file the same way, with
the browser's file name and type. Both are reproduced here as they were written, so the
requests are exactly what `requests` encodes for them.

    python replaced_service_clients.py BASE_URL IMAGE_PATH

Prints one JSON object per request (status, content type, PNG size, headers) on stdout and
exits non-zero on the first failed expectation.
"""

import json
import struct
import sys

import requests


def png_size(data):
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def report(name, response):
    summary = {
        "client": name,
        "status": response.status_code,
        "content_type": response.headers.get("Content-Type"),
        "location": response.headers.get("Location"),
        "input_object": response.headers.get("x-input-object"),
        "output_object": response.headers.get("x-output-object"),
        "size": png_size(response.content) if response.status_code == 201 else None,
    }
    print(json.dumps(summary), flush=True)
    return summary


def test_root(base):
    response = requests.get(base + "/")
    report("test_root", response)
    assert response.status_code == 200


def test_predict(base, path):
    # The original suite: the image from its `src/` directory, under the field `image`.
    with open(path, "rb") as image:
        files = {"image": ("src/berlin_000000_000019_left_image.png", image)}
        response = requests.post(base + "/predict", files=files)
    report("test_predict", response)
    assert response.status_code == 201
    assert response.headers["Content-Type"] == "image/png"


def streamlit_upload(base, path):
    # The Streamlit front end: st.file_uploader's name, bytes and MIME type.
    with open(path, "rb") as image:
        data = image.read()
    files = {"image": ("berlin_000000_000019_left_image.png", data, "image/png")}
    response = requests.post(base + "/predict", files=files, timeout=120)
    report("streamlit", response)
    assert response.status_code == 201
    assert response.headers["Content-Type"] == "image/png"


def main():
    base, path = sys.argv[1].rstrip("/"), sys.argv[2]
    test_root(base)
    test_predict(base, path)
    streamlit_upload(base, path)


if __name__ == "__main__":
    main()
