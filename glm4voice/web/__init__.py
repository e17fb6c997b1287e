"""The web demo: the app (``app.create_app``), the Gradio page and its handlers (``page``), the
per-turn audio streams (``streams``), the answer files (``files``) and the gapless Web Audio player
(``player.js``, loaded into the page's head by ``page.page_head``)."""

from importlib import resources


def player_script() -> str:
    """The source of the page's streaming player."""
    return resources.files(__name__).joinpath("player.js").read_text(encoding="utf-8")
