"""Data: image IO, MATLAB-compatible bicubic degradation, the embedded demo set and the data stage."""
