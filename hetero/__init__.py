"""hetero: split one inference batch across every device of a machine."""
