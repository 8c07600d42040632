"""Online guard: torch-free MMDF decisions over two ONNX networks, served over gRPC."""
