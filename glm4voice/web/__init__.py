"""The web demo's page pieces: per-turn audio streams (``streams``) and the gapless Web Audio
player (``player.js``, loaded into the page's head by ``web_demo.py``)."""

from importlib import resources


def player_script() -> str:
    """The source of the page's streaming player."""
    return resources.files(__name__).joinpath("player.js").read_text(encoding="utf-8")
