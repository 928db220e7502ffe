"""The replaced service, rebuilt as its document describes it, for end-to-end comparisons.

A Flask app behind gunicorn (1 worker, 8 threads, `--preload`, `--timeout 120`): `GET /` is a
welcome page; `POST /predict` checks the upload's file name and image size, stores the upload
under a directory (the mounted bucket), resizes it with upstream MiDaS's transform, runs the model
(a PyTorch Lightning module around upstream MiDaS v2.1 small), scales the depth by its maximum,
colours it with matplotlib's table, resizes it back to the input's size, stores the PNG and
returns it with `201`. The weights are `synthetic.state_dict`, the same ones midas-serve serves
when it is given none, so both sides compute the same network on the same numbers.

    /tmp/midas-ref/bin/pip install -r scripts/reference/requirements.txt
    cd scripts/reference && MIDAS_SRC=/tmp/MiDaS REFERENCE_STORE=/tmp/reference-store \\
        /tmp/midas-ref/bin/gunicorn --workers 1 --threads 8 --preload --timeout 120 \\
        --bind 127.0.0.1:8090 service:app

`LOAD_REFERENCE=/tmp/midas-ref/bin/gunicorn cargo bench --bench load` starts it this way and
drives it with the same clients and uploads as midas-serve.
"""

import io
import os
import pathlib
import uuid

import numpy as np
import pytorch_lightning as pl
import torch
from flask import Flask, jsonify, request, send_file
from PIL import Image

import make_fixtures
import synthetic
import upstream

MAX_PIXELS = 4096 * 4096
ALLOWED_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
STORE = pathlib.Path(os.environ.get("REFERENCE_STORE", "/tmp/reference-store"))


class MiDaSFineTuner(pl.LightningModule):
    """The fine-tuner's Lightning module: the MiDaS network as `self.model`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def load_model():
    midas_net_small, transforms, _utils = upstream.load_upstream(os.environ["MIDAS_SRC"])
    network = upstream.build_small(midas_net_small)
    layout = [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in network.state_dict().items()]
    network.load_state_dict(synthetic.state_dict(layout), strict=True)
    return MiDaSFineTuner(network).eval(), transforms


MODEL, TRANSFORMS = load_model()
TRANSFORM = make_fixtures.upstream_transform(TRANSFORMS)
app = Flask(__name__)



@app.get("/")
def welcome():
    return "<h1>Welcome to the MiDaS depth API</h1><p>POST an image to /predict.</p>", 200


@app.post("/predict")
def predict():
    upload = request.files.get("image")
    if upload is None or not upload.filename:
        return jsonify(error="missing_file", message="send the image in the form field 'image'"), 400
    if pathlib.Path(upload.filename).suffix.lower() not in ALLOWED_SUFFIXES:
        return jsonify(error="unsupported_type", message="expected a JPEG, PNG or WebP file"), 400
    data = upload.read()
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > MAX_PIXELS:
        return jsonify(error="too_large", message="the image has too many pixels"), 413
    name = uuid.uuid4().hex
    (STORE / "inputs").mkdir(parents=True, exist_ok=True)
    (STORE / "inputs" / f"{name}{pathlib.Path(upload.filename).suffix}").write_bytes(data)

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(TRANSFORM({"image": rgb})["image"])[None]
    with torch.no_grad():
        depth = MODEL(tensor)[0].numpy()
    coloured = Image.fromarray(make_fixtures.colourise(depth, "inferno"))
    coloured = coloured.resize((image.width, image.height), Image.BICUBIC)

    out = io.BytesIO()
    coloured.save(out, format="PNG")
    (STORE / "outputs").mkdir(parents=True, exist_ok=True)
    (STORE / "outputs" / f"{name}.png").write_bytes(out.getvalue())
    out.seek(0)
    return send_file(out, mimetype="image/png"), 201
