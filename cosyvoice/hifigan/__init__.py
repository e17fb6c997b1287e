"""HiFT vocoder: F0 predictor, neural source filter, upsampling with Snake residual blocks, iSTFT head."""
