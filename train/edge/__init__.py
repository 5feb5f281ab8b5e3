"""INT8 quantization and edge export: ONNX / TorchScript, ONNX Runtime and PT2E INT8,
layer sensitivity, quantization-aware fine-tuning, verification and a self-describing
artefact folder (see ``vitssl.train.edge_export``)."""
