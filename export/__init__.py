"""dynseg.export: ONNX export with the dynseg::MeanFieldCRF node and the TensorRT engine builder
(issues to come; nothing here yet)."""
