"""Numbers from predictions: classification and multi-label metrics, intervals, calibration."""
