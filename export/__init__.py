"""Model packages: a checkpoint's query encoder as verified ONNX and TorchScript."""
