#!/usr/bin/env python3
"""Forward-pass medians of upstream MiDaS v2.1 small in PyTorch (eager) and ONNX Runtime, on the
same synthetic weights and inputs as `cargo bench --bench forward` and the same thread count, so
one run on one machine gives the ratios the README reports. `--openvino` adds OpenVINO's CPU
plugin on the same ONNX graph (`pip install openvino`).

    /tmp/midas-ref/bin/pip install -r scripts/reference/requirements.txt onnx onnxruntime onnxscript
    /tmp/midas-ref/bin/python scripts/reference/bench_pytorch.py --midas-src /tmp/MiDaS --threads 2

`--model dpt_hybrid_384` times upstream's DPT-Hybrid instead, at 384x384 with the weights of
`synthetic.dpt_state_dict` (needs timm 0.6.13), 5 runs unless `--runs` says otherwise. Its ONNX
graph comes from the `torch.export`-based exporter (`dynamo=True`, needs `onnxscript`): the
TorchScript-based one fails on the model as upstream writes it, and the export empties the
module-global dict upstream's forward reads its hooked features from, so PyTorch is timed first:

    /tmp/midas-ref/bin/python scripts/reference/bench_pytorch.py --midas-src /tmp/MiDaS --threads 2 --model dpt_hybrid_384

`--model depth_anything_v2_vits` (or `_vitb`) times upstream's Depth Anything V2 at 518x518 with the
weights of `synthetic.depth_anything_state_dict`, from a DepthAnything/Depth-Anything-V2 checkout:

    /tmp/midas-ref/bin/python scripts/reference/bench_pytorch.py --depth-anything-src /tmp/Depth-Anything-V2 --threads 2 --model depth_anything_v2_vits

Prints one JSON object per runtime and size: {"runtime", "shape", "runs", "median_ms", "min_ms"}.
"""

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import torch

import synthetic

SIZES = {
    "midas_v21_small_256": [(256, 256), (256, 192), (256, 128)],
    "dpt_hybrid_384": [(384, 384)],
    "depth_anything_v2_vits": [(518, 518)],
    "depth_anything_v2_vitb": [(518, 518)],
}
DEFAULT_RUNS = {"midas_v21_small_256": 30, "dpt_hybrid_384": 5, "depth_anything_v2_vits": 5, "depth_anything_v2_vitb": 3}


def measure(run, runs):
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), min(times)


def measure_openvino(onnx_path, x, threads, runs):
    """OpenVINO's CPU plugin on the exported graph, held to `threads` threads and one stream
    (its latency mode), f32 throughout: its default on CPUs with AVX-512 BF16 or AMX would run in
    bf16, which is not the same computation."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(onnx_path, "CPU", {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    })
    request = compiled.create_infer_request()
    return measure(lambda: request.infer({0: x}), runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--midas-src", help="isl-org/MiDaS checkout (the MiDaS models)")
    parser.add_argument("--depth-anything-src", help="DepthAnything/Depth-Anything-V2 checkout (its models)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=sorted(SIZES), default="midas_v21_small_256")
    parser.add_argument("--runs", type=int, help="timed runs per size (default 30; 5 for DPT-Hybrid)")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime (and OpenVINO)")
    parser.add_argument("--openvino", action="store_true",
                        help="also time OpenVINO on the same ONNX graph (pip install openvino)")
    args = parser.parse_args()
    if args.runs is None:
        args.runs = DEFAULT_RUNS[args.model]
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    if args.model.startswith("depth_anything_v2_"):
        import depth_anything

        if not args.depth_anything_src:
            parser.error("--depth-anything-src is required for Depth Anything V2")
        encoder = args.model.removeprefix("depth_anything_v2_")
        model, _ = depth_anything.build(pathlib.Path(args.depth_anything_src), encoder, metric=False)
    else:
        import upstream

        if not args.midas_src:
            parser.error("--midas-src is required for the MiDaS models")
        if args.model == "dpt_hybrid_384":
            model = upstream.build_dpt_hybrid(upstream.load_dpt(args.midas_src))
            weights = synthetic.dpt_state_dict
        else:
            MidasNet_small, _, _ = upstream.load_upstream(args.midas_src)
            model = upstream.build_small(MidasNet_small)
            weights = synthetic.state_dict
        layout = [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in model.state_dict().items()]
        model.load_state_dict(weights(layout), strict=True)

    for width, height in SIZES[args.model]:
        x = torch.from_numpy(synthetic.network_input(width, height))
        with torch.inference_mode():
            median, low = measure(lambda: model(x), args.runs)
        print(json.dumps({"runtime": "pytorch", "model": args.model, "shape": [1, 3, height, width], "runs": args.runs,
                          "median_ms": round(median, 2), "min_ms": round(low, 2)}), flush=True)

        if args.no_onnx:
            continue
        import onnxruntime

        with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
            dynamo = args.model != "midas_v21_small_256"
            torch.onnx.export(model, x, f.name, opset_version=18 if dynamo else 17, dynamo=dynamo)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(f.name, options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x.numpy()}
            median, low = measure(lambda: session.run(None, feed), args.runs)
            print(json.dumps({"runtime": "onnxruntime", "model": args.model, "shape": [1, 3, height, width],
                              "runs": args.runs, "median_ms": round(median, 2), "min_ms": round(low, 2)}), flush=True)
            if args.openvino:
                median, low = measure_openvino(f.name, x.numpy(), args.threads, args.runs)
                print(json.dumps({"runtime": "openvino", "model": args.model, "shape": [1, 3, height, width],
                                  "runs": args.runs, "median_ms": round(median, 2), "min_ms": round(low, 2)}),
                      flush=True)


if __name__ == "__main__":
    main()
