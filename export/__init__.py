"""dynseg.export: ONNX export with the dynseg::MeanFieldCRF node (`onnx`) and the TensorRT engine builder
(`engine`: the TensorRT-specific ONNX copy, the optimisation profile, the sidecar, `build_engine`)."""
