"""Defaults and limits shared by more than one part of GLM-4-Voice: one definition each.

Torch-free (the entry scripts read it before they import torch). Every module imports these names
instead of writing the value again; a value that only one module uses stays in that module.

Sampling settings have one set of bounds (:data:`TEMPERATURE`, :data:`TOP_P`,
:data:`MAX_NEW_TOKENS_MIN`, :data:`MAX_SEED`) and one checker per setting
(:func:`temperature_problem` ...) used by the token server's request schema, the engine's
``SamplingParams`` and the pipeline's ``GenerationOptions``, so a value accepted by one layer is
accepted by all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# --- processes and addresses -----------------------------------------------------------------------

TOKEN_SERVER_PORT = 10000
"""``model_server.py --port`` (the original's)."""
TOKEN_SERVER_HOST = "localhost"
"""``model_server.py --host`` (the original's)."""
WEB_DEMO_PORT = 8888
"""``web_demo.py --port`` (the original's)."""
LOOPBACK_HOST = "127.0.0.1"
"""Where the launcher runs the token server, and its page unless told otherwise."""
WEB_DEMO_HOST = LOOPBACK_HOST
"""``web_demo.py --host``: this machine only. The original listened on every interface (0.0.0.0);
here that is the explicit opt-in ``--host 0.0.0.0`` (see the README's "Exposing the demo")."""
DEFAULT_SERVER_URL = f"http://localhost:{TOKEN_SERVER_PORT}"
"""The token server a client talks to unless told otherwise (``web_demo.py --server-url``)."""

LLM_DTYPE = "bfloat16"
"""Weights of the language model unless told otherwise (``model_server.py --dtype``, the original's)."""

# --- POST /generate_stream: the original server's defaults for fields a body leaves out -----------

WIRE_TEMPERATURE = 1.0
WIRE_TOP_P = 1.0
WIRE_MAX_NEW_TOKENS = 256

# --- the demo's sampling defaults (the original web demo's sliders) --------------------------------

DEMO_TEMPERATURE = 0.2
DEMO_TOP_P = 0.8
DEMO_MAX_NEW_TOKENS = 2000

# --- caps ------------------------------------------------------------------------------------------

MAX_NEW_TOKENS_CAP = 4096
"""Largest ``max_new_tokens`` the token server accepts by default (``--max-new-tokens-cap``) and the
page's "Max new tokens" field allows. The original web demo asks for 2000; the cap leaves room."""
MAX_SEQ_LEN = 8192
"""Prompt plus generated tokens per stream (the engine's KV cache length, ``--max-seq-len``); what
the original's vLLM server used (``max_model_len``)."""
MAX_INPUT_SECONDS = 120.0
"""Longest spoken input a turn accepts (the speech tokenizer itself takes up to 10 minutes)."""
MAX_TEXT_CHARS = 4000
"""Longest typed input a turn accepts."""

# --- concurrency -----------------------------------------------------------------------------------

MAX_CONCURRENT_STREAMS = 32
"""Token streams generated at once by the token server (the engine's batch, ``--max-concurrent-streams``)."""
MAX_QUEUE = 64
"""Requests that may wait for a free stream before the token server answers 503 (``--max-queue``)."""
QUEUE_TIMEOUT_S = 60.0
RETRY_AFTER_S = 2
"""Seconds a busy server's 503 answer asks the client to wait (``Retry-After``)."""
"""Seconds a request may wait for a stream before 503 (``--queue-timeout``)."""
MAX_CONCURRENT_TURNS = 8
"""Turns the page handles at once across all users, on a CPU (``web_demo.py --max-concurrent-turns``)."""
GPU_MAX_CONCURRENT_TURNS = 32
"""The same on CUDA: the count of conversations that stay real time on one GPU, measured by
bench/e2e.py (docs/PERFORMANCE.md)."""

# --- the web player --------------------------------------------------------------------------------

PLAYER_LEAD_S = 0.15
"""The page's player starts the first sample of an answer this long after it arrives (its jitter
buffer). The page sets ``window.GLM4VOICE_PLAYER_LEAD_S`` from it, and the block pacing counts it
as audio in hand."""

# --- exposure and connections (both servers: glm4voice.serving, glm4voice.request_guard) ------------

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host names both servers answer to whatever ``--allowed-hosts`` says (plus the address they are bound
to): a request naming any other host is refused, so that a web page cannot reach them by DNS rebinding."""
HEADER_TIMEOUT_S = 10.0
"""A connection must send a complete request line and headers within this many seconds of connecting (or of
its previous answer) or it is closed (``--header-timeout``); the token server also reads its body in that time."""
MAX_CONNECTIONS = 1000
"""Open connections per server (``--max-connections``; lowered to fit the process's open-file limit). At the
cap a new connection replaces the one that has waited longest without sending a request."""
MAX_HEADER_BYTES = 64 * 1024
"""A request line plus headers still incomplete at this size is refused with 400 (browsers send a few KiB)."""
KEEP_ALIVE_S = 5
"""An idle keep-alive connection is closed after this many seconds (uvicorn's default)."""
ENGINE_FAILED_EXIT_CODE = 75
"""``model_server.py`` exits with this code when its engine has died (so that a supervisor or
``glm4voice.launch`` restarts or stops it instead of a server answering 503 forever): EX_TEMPFAIL,
"try again"; not 1 (an uncaught error), 2 (a bad command line) or 3 (uvicorn could not start)."""


# --- sampling bounds -------------------------------------------------------------------------------

FLOAT32_SMALLEST_NORMAL = 2.0**-126
"""Sampling runs in float32 on the device: a nonzero setting below this would become 0 or a
subnormal there (which GPUs may flush to 0), and mean something else than what was asked."""


@dataclass(frozen=True)
class Bounds:
    """A range of a numeric setting; ``low_open``: ``low`` itself is excluded."""

    low: float
    high: float
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


TEMPERATURE = Bounds(0.0, 100.0)
"""0 means greedy. The original accepted any float; above a few units the answer is noise already
(logits divided by the temperature flatten towards uniform), so 100 refuses nothing useful while
keeping ``logits / temperature`` well inside float32 (a huge value such as 1e39 is not even a
float32 and used to stop the engine)."""
TOP_P = Bounds(0.0, 1.0, low_open=True)
MAX_NEW_TOKENS_MIN = 1
MAX_SEED = 2**63 - 1
"""Seeds are int64 on the device: [0, 2**63)."""


def _float_problem(value: object, bounds: Bounds, hint: str = "") -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {value!r}"
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        assert isinstance(value, int)  # a float is always a float already
        return f"must be in {bounds}{hint}, got an integer of {value.bit_length()} bits"
    if not math.isfinite(number) or number not in bounds:
        return f"must be in {bounds}{hint}, got {number}"
    if number != 0 and abs(number) < FLOAT32_SMALLEST_NORMAL:
        return f"must be 0 or at least {FLOAT32_SMALLEST_NORMAL:.3g} (float32), got {number}"
    return None


def temperature_problem(value: object) -> str | None:
    """Why ``value`` is not a valid temperature, as "must be ..., got ..." (None: it is valid).
    Callers put the setting's name in front (``temperature``, or how their users call it)."""
    return _float_problem(value, TEMPERATURE, " (0 = greedy)")


def top_p_problem(value: object) -> str | None:
    """Why ``value`` is not a valid top-p (None: it is valid)."""
    return _float_problem(value, TOP_P)


def max_new_tokens_problem(value: object) -> str | None:
    """Why ``value`` is not a valid ``max_new_tokens`` (None: it is valid); a server's cap is checked apart."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MAX_NEW_TOKENS_MIN:
        return f"must be a whole number of at least {MAX_NEW_TOKENS_MIN}, got {value!r}"
    return None


def seed_problem(value: object) -> str | None:
    """Why ``value`` is not a valid seed (None: it is valid; no seed is valid)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        return f"must be None or an integer in [0, 2**63), got {value!r}"
    return None
