"""GLM-4-Voice, done properly: the library behind model_server.py and web_demo.py."""

__version__ = "0.1.0"
