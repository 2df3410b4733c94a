"""Run time: weight formats, integer kernels, quantized layers, time-table lookups and a model's routing."""
