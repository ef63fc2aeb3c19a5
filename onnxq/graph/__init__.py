"""Graph helpers shared by the passes, calibration and recipes (onnx_ir only, no quantization math).

* :mod:`~onnxq.graph.sites`: weight sites (MatMul, Gemm, Transpose->MatMul, Gather embeddings).
* :mod:`~onnxq.graph.names`: unique names for new values and nodes.
* :mod:`~onnxq.graph.constants`: constant values and initializers.
* :mod:`~onnxq.graph.edit`: replacing a site, removing what lost its users.
* :mod:`~onnxq.graph.scale_folding`: dividing a MatMul input by per-channel scales.
* :mod:`~onnxq.graph.opset`: raising the default opset (for QDQ).
"""
