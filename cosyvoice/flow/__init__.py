"""Flow matching: token embedding, encoder, length regulator, conditional flow matching (ODE) and its U-Net."""
