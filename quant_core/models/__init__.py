"""Models: which layers of an SD UNet are quantized (adapters), module-tree helpers, calibration runners."""
