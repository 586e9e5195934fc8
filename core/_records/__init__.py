"""Records and their math: ``QuantSpec``, grouping, quantizing one weight, bit packing."""
