"""What a sampling step costs and where it was measured: the op census, the roofline model, the machine record."""
