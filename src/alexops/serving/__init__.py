"""Serving: the exported model behind HTTP (`alexops serve`) and on the command line (`alexops predict`).

- `model`: the onnxruntime session, its metadata (classes, preprocessing, capture recipe) and
  where models come from (`.onnx` files, `models:/name@alias`, `models:/name/version`);
- `inputs`: image files (through `alexops.images`, the one decoder) and JSON arrays → model inputs;
- `batcher`: the micro-batcher every protocol submits to; `metrics`: Prometheus;
- `v1`, `v2`, `scoring`: the project's own API, the Open Inference Protocol, MLflow's scoring
  protocol, each a thin adapter; `app`: the FastAPI app and the process (`serve`).
"""
