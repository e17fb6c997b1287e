"""The real web process for tests: ``python tests/openai_api/web_server.py [web_demo.py flags]``.

web_demo's own loading and app (``create_app``: the page, the turn streams and the ``/v1`` routes), with
two test-only changes: fixed block sizes (``PipelineConfig(adaptive_blocks=False)``: the blocks are cut
where the schedule says, whatever the machine's load, so the same seed gives the same samples in two
calls), and a counter on the decoder served at ``GET /test/decoder`` (streams opened, blocks decoded).
"""

from __future__ import annotations

import dataclasses
import logging

import uvicorn

import web_demo
from glm4voice.pipeline import VoiceChat

DECODER_PATH = "/test/decoder"


class CountingDecoder:
    """The real decoder; counts the streams opened on it and the blocks it decodes."""

    def __init__(self, decoder):
        self._decoder = decoder
        self.streams = 0
        self.blocks = 0

    def stream(self, seed=None, **kwargs):
        self.streams += 1
        return self._decoder.stream(seed=seed, **kwargs)

    def feed_many(self, jobs, **kwargs):
        self.blocks += len(jobs)
        return self._decoder.feed_many(jobs, **kwargs)

    def __getattr__(self, name):
        return getattr(self._decoder, name)


def main() -> None:
    args = web_demo.build_parser().parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded, client = web_demo.load_chat(args)
    decoder = CountingDecoder(loaded.decoder)
    config = dataclasses.replace(loaded.config, adaptive_blocks=False)
    chat = VoiceChat(
        loaded.text_tokenizer, loaded.speech_tokenizer, decoder, client, config, server_url=args.server_url
    )
    loaded.close()
    settings = web_demo.DemoSettings(server_url=args.server_url)
    app = web_demo.create_app(chat, settings, close_client=client.aclose)

    async def decoder_counts():
        return {"streams": decoder.streams, "blocks": decoder.blocks}

    app.add_api_route(DECODER_PATH, decoder_counts, methods=["GET"])
    app.router.routes.insert(0, app.router.routes.pop())  # before the page mounted at "/"
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None)


if __name__ == "__main__":
    main()
