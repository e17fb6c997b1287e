"""``python -m glm4voice.checkpoints tiny OUT_DIR [--seed N]``"""

from __future__ import annotations

import argparse
import logging
import sys

from glm4voice.checkpoints.tiny import write_tiny_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm4voice.checkpoints", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny", help="write tiny random checkpoints in the three published formats")
    tiny.add_argument(
        "out_dir", help="folder that receives glm-4-voice-9b/, glm-4-voice-tokenizer/, glm-4-voice-decoder/"
    )
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = write_tiny_checkpoints(args.out_dir, seed=args.seed)
    for path in (result.llm, result.speech_tokenizer, result.decoder):
        print(path)
    print("random weights: answers from these checkpoints are noise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
