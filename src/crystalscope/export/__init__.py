"""Export a trained run: safetensors + model.json, ONNX with a parity check."""
