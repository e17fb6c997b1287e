"""The flow's token encoder: a Conformer with block-causal relative-position attention."""
