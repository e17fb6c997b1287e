"""The GLM-4-Voice speech decoder: CosyVoice-style flow matching (tokens -> 80-bin mel) and the HiFT
vocoder (mel -> 22.05 kHz speech), inference only.

Modules sit at the import paths that the published ``glm-4-voice-decoder/config.yaml`` names
(``cosyvoice.flow.flow.MaskedDiffWithXvec``, ``cosyvoice.hifigan.generator.HiFTGenerator``, ...), so that
file loads unchanged (see :func:`cosyvoice.config.load_decoder_config`), and their parameter names are
the keys of the published ``flow.pt`` / ``hift.pt``. The streaming front end is ``flow_inference``.
"""
