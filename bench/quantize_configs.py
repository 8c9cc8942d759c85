"""Benchmark (not a test): efficientnet_lite0's int8 configurations side by side, graph time only.

    .venv/bin/python bench/quantize_configs.py [ROUNDS]

Static int8 with per-channel weights in five forms: activations uint8 + weights int8 in QDQ (what
`vfm export --quantize int8 --calibration` makes), int8 symmetric activations (S8S8), QOperator
(QLinearConv), and QDQ with the first Conv and the classifier Gemm, or the depthwise Convs, left
float. Each is checked on the real photos first (top-1 agreement with float32), then timed against
float32 at 1 and 2 threads, batch 1 and 8, in alternating rounds (median, first round dropped).
Calibration: 24 random blob-and-edge images, as bench/quantize.py uses.
"""
import os, sys, time, statistics, logging
logging.basicConfig(level=logging.ERROR)
from pathlib import Path
import numpy as np, onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from vfm.models import get_spec
from vfm.models.export import export_model, VariantOptions
from vfm.models.export.common import parity_images
from vfm.models.export.quantize import check_classifier
from vfm.models.images import preprocess_batch
import tempfile
w = Path(tempfile.mkdtemp(prefix="vfm-bench-quantize-configs-"))
spec = get_spec("efficientnet_lite0")
f32 = w / "efficientnet_lite0" / "1" / "model.onnx"
if not f32.exists(): export_model("efficientnet_lite0", w)
prep = w / "prep.onnx"
quant_pre_process(str(f32), str(prep), skip_symbolic_shape=True)
cal = [preprocess_batch([im], spec.preprocess) for im in parity_images(3, [(300, 400), (400, 300)] * 12)]
class R(CalibrationDataReader):
    def __init__(s): s.it = iter(cal)
    def get_next(s):
        x = next(s.it, None); return None if x is None else {"input": x}
import onnx
m = onnx.load(str(prep)); convs = [n for n in m.graph.node if n.op_type == "Conv"]
dw = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
gemm = [n.name for n in m.graph.node if n.op_type in ("Gemm", "MatMul")]
configs = {
 "u8s8_qdq": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8),
 "s8s8_qdq_sym": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True}),
 "u8s8_qop": dict(quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8),
 "u8s8_qdq_first_last_float": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=[convs[0].name] + gemm),
 "u8s8_qdq_dw_float": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=dw),
}
paths = {"float32": f32}
for k, c in configs.items():
    p = w / f"{k}.onnx"
    if not p.exists(): quantize_static(str(prep), str(p), R(), per_channel=True, **c)
    paths[k] = p
    chk = check_classifier(f32, p, spec, VariantOptions(quantize="int8", min_agreement=0.0))
    print(k, "agreement", chk["top1_agreement"], "of", chk["sure_views"], flush=True)
photos = parity_images(11, [(480, 640)] * 8)
batches = {b: preprocess_batch(photos[:b], spec.preprocess) for b in (1, 8)}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
for threads in (1, 2):
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.log_severity_level = 3
    t = {}
    for r in range(rounds + 1):
        for k, p in paths.items():
            # one session alive at a time: another session's pool threads spin after its last run and take a core
            s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            for b, x in batches.items():
                for _ in range(3): s.run(["logits"], {"input": x})
                reps = 5 if b == 1 else 3
                t0 = time.perf_counter()
                for _ in range(reps): s.run(["logits"], {"input": x})
                if r: t.setdefault((k, b), []).append((time.perf_counter() - t0) / reps * 1000)
            del s
    print(f"threads {threads}, uptime load {os.getloadavg()}; ratio = variant / float32")
    for k in paths:
        print(f"  {k:28s}" + "  ".join(f"b{b} {statistics.median(t[(k,b)]):7.1f} ms ({statistics.median(t[(k,b)]) / statistics.median(t[('float32',b)]):.2f})" for b in (1, 8)), flush=True)
import shutil
shutil.rmtree(w, ignore_errors=True)
