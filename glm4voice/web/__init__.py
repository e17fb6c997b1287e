"""The web demo: the app (``app.create_app``), the Gradio page and its handlers (``page``), one browser
tab's conversation (``tab``) and what its chat shows (``chat_view``), the per-turn audio streams
(``streams``), the live socket of conversation mode (``live``), the audio files (``files``), and the
page's scripts: the gapless Web Audio player (``player.js``) and conversation mode's microphone client
(``live.js``, with its AudioWorklet ``mic_worklet.js``), loaded into the page's head by
``page.page_head``."""

from importlib import resources


def _script(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def player_script() -> str:
    """The source of the page's streaming player."""
    return _script("player.js")


def live_script() -> str:
    """The source of conversation mode's client (microphone, live socket, barge-in)."""
    return _script("live.js")


def mic_worklet_script() -> str:
    """The source of the microphone's AudioWorklet processor (served by the app, see ``live``)."""
    return _script("mic_worklet.js")
