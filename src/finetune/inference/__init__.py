"""Run a model on images: the predictor and ensembles, the torch-free ONNX path, evaluation, explanations."""
