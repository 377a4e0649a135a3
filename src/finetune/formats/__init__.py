"""Write and read each file format: .pt, .safetensors, .pt2, ONNX, OpenVINO IR, int8; load any of them to run."""
